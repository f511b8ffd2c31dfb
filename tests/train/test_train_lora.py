"""`fewstep train lora`: a tiny LoRA trained in seconds on the built-in model from a folder that
`fewstep dataset` wrote; it changes the images, diffusers' load_lora_weights reads the file and draws
fewstep's image with it, resume continues where a run stopped, and bad input is a one-line error."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fewstep
from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep import text
from fewstep.train import lora as lora_module
from fewstep.train.lora import Trainee, read_folder, train_lora
from helpers.env import requires_shared

STUDENT = Path(fewstep.__file__).parent / "assets" / "shapes-turbo"
PROMPT = "a large red rectangle on the left"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "data"
    assert main(["dataset", str(out), "--n", "24", "--new-shape", "rectangle", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(data) -> tuple[Path, dict]:
    out = data.parent / "rect.safetensors"
    report = train_lora(None, data, out, rank=4, text_encoder=True, steps=12, batch=4, lr=3e-3, seed=1)
    return out, report


def test_dataset_folder_pairs_images_and_captions(data):
    pngs, txts = sorted(data.glob("*.png")), sorted(data.glob("*.txt"))
    assert len(pngs) == len(txts) == 24 and [p.stem for p in pngs] == [t.stem for t in txts]
    assert sum("rectangle" in t.read_text() for t in txts) >= 6
    images, captions = read_folder(data, 128)
    assert images.shape == (24, 128, 128, 3) and captions[0] == txts[0].read_text().strip()


def test_the_file_is_diffusers_peft_format_and_small(trained):
    out, report = trained
    assert report["steps"] == 12 and report["images"] == 24 and report["out"] == str(out)
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    unet = [k for k in keys if k.startswith("unet.")]
    text = [k for k in keys if k.startswith("text_encoder.text_model.")]
    from fewstep.train.lora import UNET_TARGETS
    pipe = fewstep.load(STUDENT)
    targets = [n for n, _ in pipe.unet.named_modules() if n.endswith(tuple("." + t for t in UNET_TARGETS))]
    assert len(unet) == 2 * len(targets) and any(".resnets.0.conv1." in k for k in unet)  # A and B each
    assert len(text) == 4 * 2 * 4 and len(unet) + len(text) == len(keys)  # 4 layers x q, k, v, out
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys) and dtypes == {"F16"}
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4.0 and meta["text_encoder.r"] == 4
    unet_bytes = (STUDENT / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert out.stat().st_size <= 0.05 * unet_bytes
    assert (out.parent / "rect.train" / "logs" / "lora.jsonl").is_file()


def test_it_changes_the_images_and_diffusers_draws_the_same(trained):
    """fewstep with the LoRA against diffusers' StableDiffusionPipeline + load_lora_weights on the
    shipped folder, Euler at 2 steps from the same latents: mean |diff| <= 1/255."""
    import diffusers
    out, _ = trained
    pipe = fewstep.load(STUDENT)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(steps=2, guidance=0.0, sampler="euler", latents=latents, progress=False)
    plain = np.asarray(pipe(PROMPT, **kw)[0], np.int16)
    pipe.load_lora(out)
    ours = np.asarray(pipe(PROMPT, **kw)[0], np.int16)
    assert np.abs(ours - plain).mean() > 1.0, "the LoRA changed nothing"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(STUDENT, torch_dtype=torch.float32, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(out))
    theirs = ref(PROMPT, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(), height=128, width=128,
                 output_type="np").images[0]
    diff = np.abs(ours - np.round(theirs * 255).astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


def test_stop_and_resume_give_the_straight_run(data, trained):
    straight, _ = trained
    out = data.parent / "resumed.safetensors"
    kw = dict(rank=4, text_encoder=True, steps=12, batch=4, lr=3e-3, seed=1)
    first = train_lora(None, data, out, stop_at=7, **kw)
    assert first["steps"] == 7 and not out.exists()
    assert train_lora(None, data, out, resume=True, **kw)["steps"] == 12
    with safe_open(str(out), "pt") as a, safe_open(str(straight), "pt") as b:
        assert all(torch.allclose(a.get_tensor(k).float(), b.get_tensor(k).float(), atol=2e-3) for k in a.keys())


@pytest.mark.parametrize("text_encoder", [True, False])
def test_caption_dropout_trains_the_empty_prompt(data, tmp_path, monkeypatch, text_encoder):
    """--caption-dropout P: a caption becomes the empty prompt with probability P (the teacher's own 10%, which
    keeps the unconditional branch of classifier-free guidance the base model's); at 0 none does."""
    seen = {}
    forward = Trainee.forward

    def spy(self, x, t, context=None, captions=None):
        seen.setdefault(dropout, []).append(list(captions) if context is None else context.clone())
        return forward(self, x, t, context, captions)

    monkeypatch.setattr(Trainee, "forward", spy)
    for dropout in (0.0, 0.5, 1.0):
        train_lora(None, data, tmp_path / f"{dropout}.safetensors", rank=2, text_encoder=text_encoder, steps=3,
                   batch=8, seed=2, caption_dropout=dropout)
    if text_encoder:
        empties = {p: sum(c == "" for b in batches for c in b) for p, batches in seen.items()}
    else:
        pipe = fewstep.load(STUDENT)
        empty = text.encode(pipe.tokenizers, pipe.text_encoders, pipe.conditioning, [[""]], "cpu", torch.float32)[0][0]
        empties = {p: sum(torch.equal(c, empty[0]) for b in batches for c in b) for p, batches in seen.items()}
    assert empties[0.0] == 0 and empties[1.0] == 24 and 4 <= empties[0.5] <= 20, empties


def test_new_token_learns_one_vector_and_nothing_else_of_the_text_encoder(data, tmp_path, monkeypatch, capsys):
    """--new-token rectangle --init-word square: the vector starts at square's, only its row of the token table
    trains, and it is written as an A1111 embedding (rectangle.safetensors) that load_embedding reads."""
    rows = {}
    add_token = lora_module.add_token

    def spy(pipe, token, init_word):
        rows["weight"] = add_token(pipe, token, init_word)
        rows["start"] = rows["weight"].detach().clone()
        rows["square"] = rows["start"][pipe.tokenizers[0].ids("square")[0]]
        return rows["weight"]

    monkeypatch.setattr(lora_module, "add_token", spy)
    report = train_lora(None, data, tmp_path / "l.safetensors", rank=2, steps=4, batch=4, lr=1e-2, seed=1,
                        new_token="rectangle", init_word="square")
    w, start = rows["weight"].detach(), rows["start"]
    assert torch.equal(start[-1], rows["square"]) and torch.equal(w[:-1], start[:-1])
    assert (w[-1] - start[-1]).abs().max() > 1e-3
    assert report["embedding"] == str(tmp_path / "rectangle.safetensors")
    pipe = fewstep.load(None)
    assert pipe.load_embedding(tmp_path / "rectangle.safetensors") == "rectangle"
    assert pipe.tokenizers[0].ids("a red rectangle") == [320, 570, w.shape[0] - 1]
    assert torch.equal(pipe.text_encoders[0].text_model.embeddings.token_embedding.weight[-1], w[-1])
    assert main(["eval", "--new-shape", "rectangle", "--n", "2", "--steps", "1", "--lora", str(tmp_path / "l.safetensors"),
                 "--embedding", str(tmp_path / "rectangle.safetensors")]) == 0  # eval loads both
    assert "| shapes-turbo | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("prior,kw", [(True, {"new_token": "zebra"}), (False, {"new_token": "zebra"}),
                                      (True, {"text_encoder": True}), (True, {}), (False, {})])
def test_prior_preservation_keeps_the_base_where_the_word_is_absent(data, tmp_path, prior, kw):
    """A word no caption holds: with prior preservation every target is the base model's own prediction, which
    the zero-initialised LoRA already makes, so nothing moves (every lora_B stays 0); without it the images'
    targets move it. With a new token, with text adapters and with cached contexts (UNet only)."""
    out = tmp_path / "l.safetensors"
    train_lora(None, data, out, rank=2, steps=3, batch=4, lr=1e-2, seed=1, caption_dropout=0.3,
               prior="zebra" if prior else None, **kw)
    with safe_open(str(out), "pt") as f:
        moved = max(f.get_tensor(k).abs().max().item() for k in f.keys() if "lora_B" in k)
    assert (moved == 0) == prior, moved


def test_prior_preservation_learns_from_the_captions_with_the_word(data, tmp_path, monkeypatch):
    """A word some captions hold: the base prediction is computed for the other rows alone, and the rows with
    the word still move the LoRA."""
    sizes = []
    forward = Trainee.forward

    def spy(self, x, t, context=None, captions=None):
        sizes.append(len(x))
        return forward(self, x, t, context, captions)

    monkeypatch.setattr(Trainee, "forward", spy)
    out = tmp_path / "l.safetensors"
    train_lora(None, data, out, rank=2, text_encoder=True, steps=3, batch=8, lr=1e-2, seed=1, prior="rectangle")
    with safe_open(str(out), "pt") as f:
        moved = max(f.get_tensor(k).abs().max().item() for k in f.keys() if "lora_B" in k)
    assert moved > 0 and sizes[0::2] == [8, 8, 8] and all(0 < n < 8 for n in sizes[1::2]), sizes


@pytest.mark.parametrize("kind,expected", [("epsilon", [1.0, 0.5]), ("v_prediction", [2 / 3, 5 / 11]),
                                            ("sample", [2.0, 5.0])])
def test_min_snr_weight_per_prediction_type(kind, expected):
    """min(SNR, 5) over SNR (epsilon), SNR + 1 (v) or 1 (x0), at SNR 2 and 10."""
    from fewstep.train.teacher import min_snr_weight
    ac = torch.tensor([2 / 3, 10 / 11])  # SNR = a / (1 - a) = 2, 10
    assert torch.allclose(min_snr_weight(torch.tensor([0, 1]), ac, 5.0, kind), torch.tensor(expected))


def test_snr_gamma_weights_each_row_and_offset_noise_shifts_each_channel(data, tmp_path, monkeypatch):
    """--snr-gamma G: the loss is the mean over rows of the row's MSE times min(SNR, G) / (SNR + 1) (the
    student's v-prediction form); --offset-noise S: the same draws' noise plus one constant per image and
    channel (so the base model's own objective, min-SNR-5 and offset noise 0.1, can be the LoRA's)."""
    seen = []
    forward, descend, diffuse = Trainee.forward, lora_module.descend, lora_module.diffuse

    def spy_forward(self, x, t, context=None, captions=None):
        seen.append({"t": t.clone(), "out": forward(self, x, t, context, captions)})
        return seen[-1]["out"]

    def spy_diffuse(x0, noise, t, ac):
        seen.append({"x0": x0.clone(), "noise": noise.clone(), "ac": ac})
        return diffuse(x0, noise, t, ac)

    def spy_descend(accel, optimizer, loss):
        seen.append({"loss": loss.detach().clone()})
        return descend(accel, optimizer, loss)

    monkeypatch.setattr(Trainee, "forward", spy_forward)
    monkeypatch.setattr(lora_module, "diffuse", spy_diffuse)
    monkeypatch.setattr(lora_module, "descend", spy_descend)
    runs = {}
    for name, kw in (("plain", {}), ("weighted", {"snr_gamma": 5.0, "noise_offset": 0.1})):
        seen.clear()
        train_lora(None, data, tmp_path / f"{name}.safetensors", rank=2, steps=1, batch=4, lr=1e-3, seed=5, **kw)
        runs[name] = {k: v for d in seen for k, v in d.items()}
    w = runs["weighted"]
    shift = w["noise"] - runs["plain"]["noise"]
    assert torch.allclose(shift, shift.mean((2, 3), keepdim=True), atol=1e-6) and shift.abs().min() > 1e-4
    a = w["ac"][w["t"]].view(-1, 1, 1, 1)
    v = a.sqrt() * w["noise"] - (1 - a).sqrt() * w["x0"]
    snr = (a / (1 - a)).flatten()
    rows = ((w["out"].detach() - v) ** 2).mean((1, 2, 3))
    assert torch.allclose(w["loss"], (rows * snr.clamp(max=5.0) / (snr + 1)).mean(), rtol=1e-5)
    assert not torch.allclose(w["loss"], rows.mean(), rtol=1e-3)


@pytest.mark.parametrize("make,args,match", [
    (None, ["--data", "{tmp}/none"], "--data .*none: no such folder"),
    ("empty", ["--data", "{tmp}/d"], "no images"),
    ("bare", ["--data", "{tmp}/d"], "1 of 1 images have no caption file \\(e.g. a.png needs a.txt\\)"),
    ("ok", ["--data", "{tmp}/d", "--out", "{tmp}/x.pt"], "a LoRA is written as a .safetensors file"),
    ("ok", ["--data", "{tmp}/d", "--rank", "0"], "--rank is 1 to 256"),
    ("ok", ["--data", "{tmp}/d", "--caption-dropout", "1.5"], "--caption-dropout is a probability between 0 and 1"),
    ("ok", ["--data", "{tmp}/d", "--prior-preservation"], "--prior-preservation needs the concept's word"),
    ("ok", ["--data", "{tmp}/d", "--init-word", "red"], "--init-word needs --new-token"),
    ("ok", ["--data", "{tmp}/d", "--prior-preservation", "red square"],
     "--prior-preservation 'red square': give the one word of the concept"),
    ("ok", ["--data", "{tmp}/d", "--new-token", "square"],
     "--new-token 'square': give one word the model does not know"),
    ("ok", ["--data", "{tmp}/d", "--new-token", "zebra", "--init-word", "red square"],
     "--init-word 'red square' is 2 tokens: give a word of one"),
    ("ok", ["--data", "{tmp}/d", "--new-token", "l"], "the embedding for 'l' is written as l.safetensors"),
    (None, [], "train lora needs --data"),
    ("ok", ["--data", "{tmp}/d", "--workers", "0", "--two-objects", "0.5", "--offset-noise", "0.1"],
     "--workers, --two-objects: options of the recipe's stages, not of lora$"),
    ("ok", ["--data", "{tmp}/d", "--snr-gamma", "0"], "--snr-gamma is a number above 0, not 0.0"),
    ("ok", ["--data", "{tmp}/d", "--offset-noise", "-1"], "--offset-noise is a standard deviation, 0 or more"),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, args, match):
    d = tmp_path / "d"
    if make:
        d.mkdir()
        if make != "empty":
            from PIL import Image
            Image.new("RGB", (64, 48), "red").save(d / "a.png")
        if make == "ok":
            (d / "a.txt").write_text("a red square")
    argv = ["train", "lora", "--out", str(tmp_path / "l.safetensors"), "--steps", "1",
            *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(match, err) and "\n" not in err, err
    assert not (tmp_path / "l.safetensors").exists()


@requires_shared
def test_sdxl_is_refused_clearly(tmp_path, tiny_folders):
    with pytest.raises(FewstepError, match="SD 1.x / 2.x-type models"):
        train_lora(tiny_folders["sdxl"], tmp_path, tmp_path / "l.safetensors")


def test_eval_scores_the_new_shape_with_the_lora(trained, capsys):
    """`fewstep eval --new-shape rectangle --lora FILE`: the held-out rectangle prompts, the LoRA loaded."""
    from fewstep.shapes.caption import concept_prompts
    prompts = concept_prompts(0, 6, "rectangle")
    assert sum(" and " in p for p in prompts) == 3 and all("rectangle" in p.split(" and ")[0] for p in prompts)
    out, _ = trained
    assert main(["eval", "--new-shape", "rectangle", "--n", "6", "--lora", f"{out}:0.5", "--steps", "1"]) == 0
    table = capsys.readouterr().out
    assert "| shapes-turbo | 1 |" in table and "(3) |" in table
