"""The teacher stages (teacher, refine, pairs, swap; fewstep.train.teacher): which text-encoder layers each
tunes and ships, --text-layers / --offset-noise / --init, the data worker's text split, the training noise,
the swap contrast, and the scene mix and bf16 encoder of the latent data stream."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError
from helpers.train import PROMPTS


def test_refined_text_encoder_ships(run):
    """The recipe's teacher keeps the CLIP stage's text encoder frozen (its copy in OUT/teacher equals
    the CLIP's); refine tunes exactly its last layer (tiny: text_layers 1) and final LayerNorm, pairs
    and swap tune the same ones on, and both exported folders carry swap's (fp16)."""
    out, _ = run
    clip = load_file(out / "clip" / "text_encoder" / "model.safetensors")
    teacher = load_file(out / "teacher" / "text_encoder" / "model.safetensors")
    assert clip.keys() == teacher.keys() and all(torch.equal(clip[k], teacher[k]) for k in clip)
    refined = load_file(out / "refine" / "text_encoder" / "model.safetensors")
    moved = {k for k in clip if not torch.equal(clip[k], refined[k])}
    tuned = {k for k in clip if k.startswith(("text_model.encoder.layers.1.", "text_model.final_layer_norm."))}
    assert moved == tuned
    pairs = load_file(out / "pairs" / "text_encoder" / "model.safetensors")
    final = load_file(out / "swap" / "text_encoder" / "model.safetensors")
    assert {k for k in clip if not torch.equal(refined[k], pairs[k])} == tuned
    assert {k for k in clip if not torch.equal(pairs[k], final[k])} == tuned
    for folder in ("shapes-teacher", "shapes-turbo"):
        shipped = load_file(out / folder / "text_encoder" / "model.safetensors")
        assert all(torch.equal(shipped[k], final[k].half()) for k in final), folder


def test_teacher_options_tune_text_layers(run, tmp_path):
    """--text-layers 1 --offset-noise 0.1: exactly the text encoder's last layer and final LayerNorm
    move from the CLIP's (the embeddings and the earlier layer stay), and the UNet trains differently."""
    from fewstep.train.recipe import run_stage
    out = tmp_path / "run"
    for part in ("tokenizer", "clip", "vae"):
        shutil.copytree(run[0] / part, out / part)
    run_stage("teacher", out, tiny=True, text_layers=1, offset_noise=0.1)
    clip = load_file(out / "clip" / "text_encoder" / "model.safetensors")
    tuned = load_file(out / "teacher" / "text_encoder" / "model.safetensors")
    n = json.loads((out / "clip" / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    moved = {k for k in clip if not torch.equal(clip[k], tuned[k])}
    assert moved == {k for k in clip if k.startswith((f"text_model.encoder.layers.{n - 1}.",
                                                      "text_model.final_layer_norm."))}
    assert any(k.startswith("text_model.embeddings.") for k in clip) and n == 2
    plain = load_file(run[0] / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    unet = load_file(out / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(plain[k], unet[k]) for k in plain)  # the options changed the training


def test_teacher_fine_tunes_from_init(run, tmp_path):
    """--init DIR: the teacher starts from DIR's UNet and text encoder (a tuned one's frozen layers feed
    the data worker), so a few small steps stay near them; a folder with no teacher is a one-line error."""
    from fewstep.train.recipe import run_stage
    out = tmp_path / "run"
    for part in ("tokenizer", "clip", "vae"):
        shutil.copytree(run[0] / part, out / part)
    run_stage("teacher", out, tiny=True, text_layers=1)
    init = tmp_path / "init"
    shutil.move(out / "teacher", init)
    shutil.rmtree(out / "checkpoints")
    run_stage("teacher", out, tiny=True, text_layers=1, init=str(init), lr=1e-6)
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        start = load_file(init / part / f"{name}.safetensors")
        tuned = load_file(out / "teacher" / part / f"{name}.safetensors")
        assert start.keys() == tuned.keys()
        assert 0 < max(float((start[k] - tuned[k]).abs().max()) for k in start) < 1e-4, part
    clip = load_file(out / "clip" / "text_encoder" / "model.safetensors")  # init's own text encoder was read:
    from_clip = max(float((clip[k] - tuned[k]).abs().max()) for k in clip)  # the tuned one is far nearer to it
    assert from_clip > 10 * max(float((start[k] - tuned[k]).abs().max()) for k in start)
    with pytest.raises(FewstepError, match="no trained teacher"):
        run_stage("teacher", out, tiny=True, init=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("tuned", [0, 1, 2])
def test_text_split_equals_the_whole_encoder(run, tuned):
    """The data worker's frozen prefix (first n - k layers) then Conditioned.context (last k layers
    and the final LayerNorm) is exactly the text encoder's last hidden state."""
    from fewstep.loading.folders import load_text_encoder
    from fewstep.tokenizer import CLIPTokenizer
    from fewstep.train.teacher import Conditioned, text_prefix
    text = load_text_encoder(run[0] / "clip" / "text_encoder")
    ids = CLIPTokenizer.from_folder(run[0] / "tokenizer")(PROMPTS)
    joint = Conditioned(torch.nn.Identity(), text, tuned)
    with torch.no_grad():
        split = joint.context(text_prefix(text, ids, joint.start))
        assert torch.equal(split, text(ids).last_hidden_state)
    assert joint.start == 2 - tuned and any(p.requires_grad for p in text.parameters()) == (tuned > 0)


def test_offset_noise():
    """Training noise: unit Gaussian plus a per-image, per-channel constant of std `offset`; the
    same generator draws the same noise, and offset 0 is plain Gaussian noise."""
    from fewstep.train.common import generator
    from fewstep.train.teacher import training_noise
    noise = training_noise((256, 4, 16, 16), generator(7), 0.1)
    offsets = noise.mean((2, 3))  # [256, 4]: the offset + the mean of 256 unit normals (std 1/16)
    assert 0.105 < float(offsets.std()) < 0.135  # sqrt(0.1^2 + (1/16)^2) = 0.118; without the offset 0.0625
    assert 0.95 < float((noise - noise.mean((2, 3), keepdim=True)).std()) < 1.05
    assert torch.equal(noise, training_noise((256, 4, 16, 16), generator(7), 0.1))  # seeded: resumable
    plain = training_noise((256, 4, 16, 16), generator(7), 0.0)
    assert torch.equal(plain, torch.randn((256, 4, 16, 16), generator=generator(7)))


def test_swap_contrast():
    """The swap contrast (teacher.denoising_loss, --swap W): for rows with a position-swapped twin caption
    at t >= SWAP_MIN_T, relu(mse_true - mse_twin + margin * mse_true), min-SNR weighted, summed / batch.
    A model blind to the caption pays exactly the margin on those rows; one whose twin error is far above
    its true error pays nothing; weight 0 leaves the plain loss."""
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.common import generator
    from fewstep.train.export import TRAIN_SCHEDULE
    from fewstep.train.teacher import SWAP_MARGIN, SWAP_MIN_T, denoising_loss, min_snr_weight, training_noise
    ac = alphas_cumprod(TRAIN_SCHEDULE)
    b = {"latents": torch.randn(8, 4, 4, 4, generator=generator(3)), "seed": 0, "hidden": torch.zeros(8, 3, 2),
         "swap_index": torch.tensor([1, 3, 6]), "swap_hidden": torch.ones(3, 3, 2)}
    g = generator(1)
    t = torch.randint(0, len(ac), (8,), generator=g)
    noise = training_noise((8, 4, 4, 4), g, 0.0)
    rows = [i for i in (1, 3, 6) if t[i] >= SWAP_MIN_T]
    assert rows == [3, 6]  # t = 139 at row 1: too little noise for the contrast

    def blind(x, t, hidden):
        return torch.zeros_like(x)

    plain, mse, zero = denoising_loss(blind, b, ac)
    loss, mse_swap, contrast = denoising_loss(blind, b, ac, swap=2.0)
    per_sample = noise.pow(2).mean((1, 2, 3))
    expected = sum(float(SWAP_MARGIN * per_sample[i] * min_snr_weight(t[i:i + 1], ac)) for i in rows) / 8
    assert float(zero) == 0 and float(mse_swap) == pytest.approx(float(mse)) == pytest.approx(float(per_sample.mean()))
    assert float(contrast) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(float(plain) + 2 * expected, rel=1e-5)

    def binding(x, t, hidden):  # reads the twin caption (hidden of ones) as "draw something else"
        return 10 * hidden.mean((1, 2)).view(-1, 1, 1, 1).expand_as(x)

    assert float(denoising_loss(binding, b, ac, swap=2.0)[2]) == 0


def test_swap_option_trains_and_logs(run, tmp_path):
    """pairs with --swap: the data carry the twins' hidden states, the loss log has the contrast column
    (as the recipe's swap stage's log has)."""
    out, _ = run
    logged = [json.loads(line) for line in (out / "logs" / "swap.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["swap"]) and r["swap"] >= 0 for r in logged)
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "pairs", "student"))
    from fewstep.train.recipe import run_stage
    run_stage("pairs", copy, tiny=True, swap=1.0, two_objects=1.0, caption_drop=0.0)
    rows = [json.loads(line) for line in (copy / "logs" / "pairs.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["swap"]) and r["swap"] >= 0 for r in rows) and any(r["swap"] > 0 for r in rows)


def test_latent_data_draws_the_stage_mix(run):
    """LatentData renders the stage's scene mix: (two-object fraction, caption-part drop) = (1, 0) gives
    full two-object captions only, and the default mix is the renderer's default batch."""
    from fewstep.shapes.data import batch
    from fewstep.train.common import seed_for
    from fewstep.train.sizes import TINY
    from fewstep.train.teacher import LatentData
    text = run[0] / "clip" / "text_encoder"
    two = LatentData(run[0], "teacher", TINY, 0, 6, 0, 0.0, text, mix=(1.0, 0.0))(3)["captions"]
    assert all(" and " in c and " background" in c for c in two), two
    plain = LatentData(run[0], "teacher", TINY, 0, 6, 0, 0.0, text)(3)["captions"]
    assert plain == batch(seed_for(0, "teacher", 3), 6, size=TINY.image)[1]


def test_latent_data_encodes_in_bf16_where_the_cpu_has_it(run):
    """The data stream's VAE encoder runs under bf16 autocast when `native_bf16("cpu")` (the recipe's setting, docs/
    SHAPES.md): fp32 latents a little off the fp32 encoder's, same captions; off, exactly fp32."""
    from fewstep.loading.dtypes import native_bf16
    from fewstep.train.sizes import TINY
    from fewstep.train.teacher import LatentData
    data = LatentData(run[0], "teacher", TINY, 0, 6, 0, 0.0, run[0] / "clip" / "text_encoder")
    assert data.bf16 == native_bf16("cpu")
    data.bf16 = False
    fp32 = data(3)
    data.bf16 = True  # autocast runs bf16 on any CPU (emulated where it is not native)
    bf16 = data(3)
    assert fp32["latents"].dtype == bf16["latents"].dtype == torch.float32 and bf16["captions"] == fp32["captions"]
    err = (bf16["latents"] - fp32["latents"]).abs().max() / fp32["latents"].std()
    assert 0 < err < 0.1, err
