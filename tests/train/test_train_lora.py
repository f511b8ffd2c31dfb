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
from fewstep.train.lora import read_folder, train_lora
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


@pytest.mark.parametrize("make,args,match", [
    (None, ["--data", "{tmp}/none"], "--data .*none: no such folder"),
    ("empty", ["--data", "{tmp}/d"], "no images"),
    ("bare", ["--data", "{tmp}/d"], "1 of 1 images have no caption file \\(e.g. a.png needs a.txt\\)"),
    ("ok", ["--data", "{tmp}/d", "--out", "{tmp}/x.pt"], "a LoRA is written as a .safetensors file"),
    ("ok", ["--data", "{tmp}/d", "--rank", "0"], "--rank is 1 to 256"),
    (None, [], "train lora needs --data"),
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
    argv = ["train", "lora", "--out", str(tmp_path / "l.safetensors"), *[a.format(tmp=tmp_path) for a in args]]
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
