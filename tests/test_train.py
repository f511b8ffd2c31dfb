"""The training recipe (fewstep.train): a smoke run of every stage on tiny models, exact resume,
the exported folders against diffusers / transformers, a 2-process data-parallel stage, and the
size budgets of the shipped model's architecture.

Parity tolerance for exported folders (as for every pipeline): mean abs <= 1/255, max <= 4/255.
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fewstep
from fewstep.errors import FewstepError

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("clip", "vae", "teacher", "refine", "pairs", "swap", "student")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The whole tiny recipe, once: tokenizer, CLIP, VAE, teacher, refine, pairs, swap, pool, student, export."""
    from fewstep.train.recipe import run_all
    out = tmp_path_factory.mktemp("train") / "run"
    report = run_all(out, tiny=True, seed=0)
    return out, report


def test_every_stage_writes_its_outputs(run):
    out, report = run
    assert list(report) == ["tokenizer", "clip", "vae", "teacher", "refine", "pairs", "swap", "pool", "student",
                            "export"]
    for path in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                 "tokenizer/special_tokens_map.json", "clip/text_encoder/model.safetensors",
                 "clip/image_tower.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "teacher/unet/diffusion_pytorch_model.safetensors", "teacher/text_encoder/model.safetensors",
                 "refine/unet/diffusion_pytorch_model.safetensors", "refine/text_encoder/model.safetensors",
                 "pairs/unet/diffusion_pytorch_model.safetensors", "pairs/text_encoder/model.safetensors",
                 "swap/unet/diffusion_pytorch_model.safetensors", "swap/text_encoder/model.safetensors",
                 "pool/pool.safetensors",
                 "student/unet/diffusion_pytorch_model.safetensors",
                 "shapes-teacher/model_index.json", "shapes-turbo/fewstep.json", "report.json",
                 "samples/teacher-00006.png", "samples/refine-00006.png", "samples/pairs-00006.png",
                 "samples/swap-00006.png",
                 "samples/student-00006.png"):
        assert (out / path).is_file(), path
    for stage in TRAINED:
        rows = [json.loads(line) for line in (out / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4, 6], stage  # tiny: 6 steps, a row every 2
        assert all(math.isfinite(v) for r in rows for v in r.values()), stage
        assert (out / "logs" / f"{stage}.png").stat().st_size > 1000, stage
        assert (out / "checkpoints" / stage / "model.safetensors").is_file(), stage
    assert json.loads((out / "shapes-turbo" / "fewstep.json").read_text()) == {"steps": 4, "guidance": 0.0,
                                                                              "sampler": "lcm"}
    assert json.loads((out / "shapes-teacher" / "fewstep.json").read_text())["sampler"] == "euler_a"
    for name, spacing, prediction in (("shapes-turbo", "trailing", "v_prediction"),
                                      ("shapes-teacher", "linspace", "epsilon")):
        scheduler = json.loads((out / name / "scheduler" / "scheduler_config.json").read_text())
        assert (scheduler["timestep_spacing"], scheduler["prediction_type"]) == (spacing, prediction), name
    weights = load_file(out / "shapes-turbo" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}


@pytest.mark.parametrize("stage,start", [("refine", "teacher"), ("pairs", "refine"), ("swap", "pairs"),
                                         ("student", "swap")])
def test_stage_starts_from_the_last_and_moves(run, stage, start):
    """refine fine-tunes the teacher, pairs the refined teacher, swap the pairs teacher, the student is
    distilled from swap's teacher: each starts from the earlier UNet (6 small steps away), not re-initialised."""
    out, _ = run
    before = load_file(out / start / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / stage / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert 0 < max(float((before[k] - after[k]).abs().max()) for k in before) < 0.05


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


def test_discriminator_has_a_whole_map_head(run):
    """Besides one per-position head per feature map, one head judges the whole lowest map at once: it
    gives one logit per image, it trains in the student stage (the checkpointed discriminator's whole-map
    weights moved from their seeded init), and its logit depends on where things are on the map."""
    from fewstep.loading.folders import load_unet
    from fewstep.train.distill import Discriminator, feature_channels, feature_side
    teacher = load_unet(run[0] / "swap" / "unet")
    channels, side = feature_channels(teacher), feature_side(teacher)
    torch.manual_seed(0)  # the stage's seed, drawn just before its discriminator
    disc = Discriminator(channels, 32, side)
    trained = load_file(run[0] / "checkpoints" / "student" / "model_1.safetensors")
    assert trained.keys() == disc.state_dict().keys()
    assert not torch.equal(trained["whole.fc.weight"], disc.state_dict()["whole.fc.weight"])
    feats = [torch.randn(2, c, 2 * side if i == 0 else side, 2 * side if i == 0 else side)
             for i, c in enumerate(channels)]
    with torch.no_grad():
        logits = disc(feats, torch.randn(2, 32))
        assert [x.shape[1] for x in logits] == [f.shape[2] * f.shape[3] for f in feats] + [1]
        perm = torch.randperm(side * side, generator=torch.Generator().manual_seed(1))
        shuffled = feats[-1].flatten(2)[:, :, perm].view_as(feats[-1])
        assert not torch.allclose(disc.whole(shuffled, torch.zeros(2, 32)), disc.whole(feats[-1], torch.zeros(2, 32)))


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_x0_inverts_the_forward_process(prediction_type):
    """The student's x0 from its output: x_t = sqrt(a) x0 + sqrt(1 - a) eps, the UNet's target eps or
    v = sqrt(a) eps - sqrt(1 - a) x0; to_x0 gives x0 back at every timestep, t = 999 included."""
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.distill import to_x0
    from fewstep.train.export import TRAIN_SCHEDULE
    from fewstep.train.teacher import diffuse
    ac = alphas_cumprod(TRAIN_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, ac = torch.tensor([0, 249, 499, 749, 999]), ac.double()
    a = ac[t].view(-1, 1, 1, 1)
    out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(to_x0(diffuse(x0, eps, t, ac), out, t, ac, prediction_type), x0, rtol=0, atol=1e-9)


PROMPTS = ["a large red circle at the top left", "A small blue square and a Green Triangle on a white background.",
           "an orange triangle!! 42 üñî <|endoftext|> x", ""]


def test_tokenizer_matches_transformers(run):
    from transformers import CLIPTokenizer as Reference

    from fewstep.tokenizer import CLIPTokenizer
    folder = run[0] / "tokenizer"
    ours = CLIPTokenizer.from_folder(folder)(PROMPTS)
    reference = Reference.from_pretrained(folder)
    assert reference.model_max_length == 32  # Sizes.context, written to tokenizer_config.json
    ref = reference(PROMPTS, padding="max_length", max_length=reference.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert ours.shape == (len(PROMPTS), 32) and torch.equal(ours, ref)
    words = ours[0][1:ours[0].tolist().index(ours[0][-1].item())]
    assert len(words) == 8  # every caption word is one token: "a large red circle at the top left"


def test_export_scores_the_student_at_one_step_and_four(run, tmp_path, monkeypatch):
    """The closing check of `train all` (full size only): the teacher at its own defaults, the student at 1 step as
    `student` and at 4 as `student_4_steps` (its own default is 4, which once made both rows 4-step rows)."""
    from fewstep.train import recipe
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    calls = []
    monkeypatch.setattr(recipe, "evaluate", lambda pipe, n, **kw: calls.append(
        (pipe.defaults.steps, kw.get("steps", pipe.defaults.steps))) or {"steps": calls[-1][1]})
    report = recipe.export_and_score(out, tiny=False, n=2)
    assert calls == [(25, 25), (4, 1), (4, 4)]
    assert (report["teacher"], report["student"], report["student_4_steps"]) == ({"steps": 25}, {"steps": 1},
                                                                                 {"steps": 4})


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.int16)


@pytest.mark.parametrize("name,steps,guidance", [("shapes-turbo", 1, 0.0), ("shapes-turbo", 4, 0.0),
                                                 ("shapes-teacher", 3, 5.0)])
def test_export_matches_diffusers(run, name, steps, guidance):
    from diffusers import StableDiffusionPipeline
    folder = run[0] / name
    ref = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    pipe = fewstep.load(folder)
    size = pipe.unet.cfg.sample_size * 8
    latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(7))
    theirs = ref(PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                 height=size, width=size, output_type="np").images
    ours = pipe(PROMPTS[:2], steps=steps, guidance=guidance, latents=latents, sampler="euler", progress=False,
                output_type="pt")  # the folders' scheduler is diffusers' Euler; fewstep.json picks another sampler
    a, b = _uint8((ours / 2 + 0.5).permute(0, 2, 3, 1).numpy()), _uint8(theirs)
    assert b.std() > 5, "reference image is flat: the test could not tell pipelines apart"
    diff = np.abs(a - b)
    assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    assert (pipe.defaults.steps, pipe.defaults.sampler) == ((4, "lcm") if name == "shapes-turbo" else (25, "euler_a"))


def test_resume_replays_the_straight_run(run, tmp_path):
    """Interrupted after 3 of 6 steps and resumed == 6 steps straight: same weights, EMA and log."""
    from fewstep.train.recipe import run_stage
    folders = []
    for name in ("straight", "resumed"):
        folder = tmp_path / name
        for part in ("tokenizer", "clip", "vae"):
            shutil.copytree(run[0] / part, folder / part)
        folders.append(folder)
    straight, resumed = folders
    run_stage("teacher", straight, tiny=True, workers=1)  # with the data worker process, as the full run
    run_stage("teacher", resumed, tiny=True, workers=1, stop_at=3)
    assert not (resumed / "teacher").exists(), "an interrupted stage must not write its final weights"
    run_stage("teacher", resumed, tiny=True, workers=1, resume=True)
    a = load_file(straight / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log_a, log_b = ((f / "logs" / "teacher.jsonl").read_text().splitlines() for f in folders)
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(log_a) == strip(log_b) and len(log_b) == 3


@pytest.mark.parametrize("stage,inputs", [("vae", ("tokenizer",)),
                                          ("student", ("tokenizer", "clip", "vae", "swap", "pool"))])
def test_two_processes(run, tmp_path, stage, inputs):
    """A stage data-parallel over 2 CPU processes (gloo): the VAE through `accelerate launch` itself, the student
    (two prepared models, the generator step through the unwrapped discriminator) through `fewstep train
    --processes 2`, which launches them the same way and alone reports."""
    out = tmp_path / "ddp"
    for part in inputs:
        shutil.copytree(run[0] / part, out / part)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"] if stage == "vae" else []
    cmd = [sys.executable, *launcher, "-m", "fewstep.train.cli", stage, "--out", str(out), "--tiny"]
    cmd += ["--processes", "2", "--cpu"] * (stage == "student")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f'"{stage}": {{') == 1  # one report
    assert sorted(p.name for p in (out / "checkpoints" / stage).glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    rows = [json.loads(line) for line in (out / "logs" / f"{stage}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(math.isfinite(v) for r in rows for v in r.values())
    final = {"vae": "vae/diffusion_pytorch_model.safetensors", "student": "student/unet/diffusion_pytorch_model.safetensors"}
    assert (out / final[stage]).is_file()


def test_clip_score_and_features(run):
    from fewstep.shapes.data import batch
    from fewstep.shapes.clip import clip_score, load_clip
    model, tok = load_clip(run[0] / "clip")
    images, captions, _ = batch(3, 4, size=64)
    scores = clip_score(model, tok, images, captions)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and scores.abs().max() <= 100
    from fewstep.imaging import from_uint8
    assert model.features(from_uint8(images)).shape == (4, model.visual.proj.in_features)


def test_cli_parses_and_rejects():
    import argparse

    from fewstep.train.cli import add_train_parser, cmd_train
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "teacher", "--out", "x", "--steps", "5", "--batch", "8", "--resume", "--tiny"])
    assert (a.stage, a.steps, a.batch, a.resume, a.tiny, a.seed) == ("teacher", 5, 8, True, True, 0)
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--steps", "5"]))
    a = parser.parse_args(["train", "teacher", "--out", "x", "--text-layers", "2", "--offset-noise", "0.1"])
    assert (a.text_layers, a.offset_noise) == (2, 0.1)
    assert parser.parse_args(["train", "teacher", "--out", "x", "--init", "runs/a/teacher"]).init == "runs/a/teacher"
    for extra in (["--init", "runs/a/teacher"], ["--offset-noise", "0.1"], ["--swap", "1"]):
        with pytest.raises(FewstepError, match="options of the teacher, refine, pairs and swap stages"):
            cmd_train(parser.parse_args(["train", "student", "--out", "x", *extra]))
    for flag, dest in (("--backward-sim", "backward"), ("--one-step", "one_step")):  # the student's own options
        assert getattr(parser.parse_args(["train", "student", "--out", "x", flag, "0.5"]), dest) == 0.5
        with pytest.raises(FewstepError, match=f"{flag} is an option of the student stage"):
            cmd_train(parser.parse_args(["train", "pairs", "--out", "x", flag, "1"]))
        with pytest.raises(FewstepError, match=f"{flag} is a probability between 0 and 1, not -0.1"):
            cmd_train(parser.parse_args(["train", "student", "--out", "x", flag, "-0.1"]))
        with pytest.raises(FewstepError, match="--scale"):
            cmd_train(parser.parse_args(["train", "all", "--out", "x", flag, "1"]))
    with pytest.raises(FewstepError, match="--swap is a weight, 0 or more, not -1.0"):
        cmd_train(parser.parse_args(["train", "pairs", "--out", "x", "--swap", "-1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--swap", "1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--text-layers", "1"]))
    a = parser.parse_args(["train", "refine", "--out", "x", "--two-objects", "0.8", "--caption-drop", "0.15"])
    assert (a.two_objects, a.caption_drop) == (0.8, 0.15)
    with pytest.raises(FewstepError, match="--two-objects is a probability between 0 and 1, not 1.5"):
        cmd_train(parser.parse_args(["train", "refine", "--out", "x", "--two-objects", "1.5"]))
    with pytest.raises(FewstepError, match="--caption-drop is an option of the teacher, refine, pairs, swap and"):
        cmd_train(parser.parse_args(["train", "vae", "--out", "x", "--caption-drop", "0.1"]))
    with pytest.raises(FewstepError, match="--scale"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--two-objects", "0.8"]))
    with pytest.raises(FewstepError, match="--processes is 1 or more, not 0"):
        cmd_train(parser.parse_args(["train", "all", "--out", "x", "--processes", "0"]))
    with pytest.raises(FewstepError, match="--processes is 1 or more, not 0"):
        cmd_train(parser.parse_args(["train", "teacher", "--out", "x", "--processes", "0"]))
    with pytest.raises(FewstepError, match="needs x/tokenizer/vocab.json"):  # --init: no earlier teacher stage asked
        cmd_train(parser.parse_args(["train", "pairs", "--out", "x", "--init", "runs/a/teacher"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "decoder", "--out", "x"])


def test_pool_and_the_student_regression(run):
    """The pool stage: teacher samples from seeded noise with their captions' tokens (tiny: all kept, the
    evaluator reads only 128x128); the student draws POOL_ROWS rows a step, the same on a replay, and
    logs the regression onto them."""
    from fewstep.train.pool import POOL_ROWS, POOL_SIZE, Pool
    out, report = run
    assert report["pool"]["generated"] == report["pool"]["kept"] == POOL_SIZE["tiny"]
    pool = Pool(out)
    side = json.loads((out / "swap" / "unet" / "config.json").read_text())["sample_size"]
    assert pool.z.shape == pool.x0.shape == (POOL_SIZE["tiny"], 4, side, side)
    assert pool.ids.shape[0] == POOL_SIZE["tiny"]
    assert torch.isfinite(pool.x0).all() and not torch.equal(pool.x0, pool.z)
    rows = pool.rows(0, "student", 3, 0)
    assert rows.shape == (POOL_ROWS,) and torch.equal(rows, pool.rows(0, "student", 3, 0))
    assert not torch.equal(rows, pool.rows(0, "student", 4, 0))
    assert len(Pool(out, k=3).rows(0, "student", 3, 0)) == 3
    logged = [json.loads(line) for line in (out / "logs" / "student.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["regression"]) and r["regression"] > 0 for r in logged)


def test_launched_processes_get_the_stages_settings(run, monkeypatch):
    """`--processes N` re-runs the stage's command under `accelerate launch` with the settings spelled out: parsed
    there, they give each process the stage's Hyper (no data worker, one process each) and the same seed and resume."""
    from dataclasses import replace

    from fewstep.train import recipe
    from fewstep.train.cli import main
    out, seen = run[0], []
    for name in ("refine", "student", "vae"):
        monkeypatch.setitem(recipe.RECIPE, name, replace(recipe.RECIPE[name], train=lambda o, sz, h, seed, resume:
                                                         seen.append((h, seed, resume))))
    for name, value in (("WORLD_SIZE", "2"), ("FEWSTEP_LAUNCHED", "1"), ("ACCELERATE_USE_CPU", "true")):
        monkeypatch.setenv(name, value)  # as a launched process: trains where it is
    for stage, over in (("refine", dict(steps=7, lr=3e-4, stop_at=5, init=str(out / "teacher"), swap=0.5)),
                        ("student", dict(scale=0.5, two_objects=0.9, backward=0.25, one_step=0.7)),
                        ("vae", dict(batch=6))):
        h = recipe.hyper(stage, True, processes=3, **over)
        cmd = recipe.launch_command(stage, out, True, 3, True, h)
        assert cmd[cmd.index("--num_processes") + 1] == "3"
        assert main(cmd[cmd.index("fewstep.train.cli") + 1:]) == 0
        assert seen.pop() == (replace(h, workers=0, processes=1), 3, True)


def test_all_runs_the_unet_stages_on_the_processes_asked(tmp_path, monkeypatch):
    """`train all --processes 2`: the four teacher stages and the student get 2 processes; the CLIP and the VAE keep
    their one, and the stages without optimiser steps get no such setting."""
    from fewstep.train import recipe
    from fewstep.train.cli import main
    seen = {}
    monkeypatch.setattr(recipe, "run_stage", lambda stage, *a, **kw: seen.setdefault(stage, kw.get("processes")) or {})
    assert main(["all", "--out", str(tmp_path / "run"), "--processes", "2"]) == 0
    assert seen == {"tokenizer": None, "clip": None, "vae": None, "teacher": 2, "refine": 2, "pairs": 2, "swap": 2,
                    "pool": None, "student": 2, "export": None}
    assert recipe.UNET_STAGES == ("teacher", "refine", "pairs", "swap", "student")


def test_the_recipe_trains_its_unet_stages_on_two_processes():
    """The full recipe's default (docs/SHAPES.md, 26th session): the UNet stages on 2 CPU processes, the CLIP and the
    VAE on one; `--processes 1` (an override) gives one; the tiny smoke settings keep one."""
    from fewstep.train import recipe
    assert {s: recipe.hyper(s, False).processes for s in ("clip", "vae", *recipe.UNET_STAGES)} == {
        "clip": 1, "vae": 1, "teacher": 2, "refine": 2, "pairs": 2, "swap": 2, "student": 2}
    assert recipe.hyper("teacher", False, processes=1).processes == 1
    assert {recipe.hyper(s, True).processes for s in recipe.UNET_STAGES} == {1}
    assert recipe.hyper("teacher", False).steps == 2000


def test_pool_rows_split_over_processes_like_the_batch(run, monkeypatch):
    """Each process draws its share of a step's POOL_ROWS, as of its batch rows: one process of batch 32 all 8, each
    of two 4; the student stage's data stream gets that share (a stage of 2 rows a process of a batch of 4: 4)."""
    from types import SimpleNamespace

    from fewstep.train import distill
    from fewstep.train.pool import POOL_ROWS, rows_per_process
    from fewstep.train.recipe import hyper
    from fewstep.train.sizes import sizes
    assert [rows_per_process(n, 32) for n in (32, 16, 8, 1)] == [POOL_ROWS, POOL_ROWS // 2, POOL_ROWS // 4, 1]
    assert rows_per_process(2, 4) == POOL_ROWS // 2
    monkeypatch.setattr(distill, "ADD", lambda *a: None)  # the parts only; no optimiser
    stage = SimpleNamespace(hyper=hyper("student", tiny=True, batch=4), per_process=2, rank=1)
    _, data, _ = distill.student_setup(stage, run[0], sizes(True), seed=0)
    assert data.pool.k == POOL_ROWS // 2 and len(data(3)["pool_z"]) == POOL_ROWS // 2


def test_own_inputs_are_the_students_own_chain(run):
    """Backward simulation (Hyper.backward): a row at s gets the 4-step chain the sampler would run, unrolled here
    by hand from the same draws: x0 at pure noise (t = 999), re-noised to 749, x0 there, ..., down to s."""
    from fewstep.loading.folders import load_unet
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.distill import STUDENT_TIMESTEPS, to_x0
    from fewstep.train.export import STUDENT_PREDICTION, TRAIN_SCHEDULE
    from fewstep.train.teacher import diffuse
    student = load_unet(run[0] / "student" / "unet").eval()
    add = bare_add(student, student, torch.device("cpu"))
    shape, context = (4, 8, 8), torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([749, 249, 499])
    got = add.own_inputs(s, context, torch.Generator().manual_seed(7), shape)
    g, ac = torch.Generator().manual_seed(7), alphas_cumprod(TRAIN_SCHEDULE)
    x = torch.randn((3, *shape), generator=g)
    want = torch.empty_like(x)
    with torch.no_grad():
        for t, nxt in zip(STUDENT_TIMESTEPS, STUDENT_TIMESTEPS[1:]):
            tt = torch.full((3,), t)
            x0 = to_x0(x, student(x, tt, context), tt, ac, STUDENT_PREDICTION)
            x = diffuse(x0, torch.randn(x.shape, generator=g), torch.full((3,), nxt), ac)
            want[s == nxt] = x[s == nxt]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got[0], got[1])


def test_the_students_one_step_share():
    """--one-step P (Hyper.one_step): P of the rows at t = 999, the rest evenly over 749 / 499 / 249; unset, the
    recipe's STUDENT_WEIGHTS."""
    from fewstep.train.common import generator
    from fewstep.train.distill import STUDENT_TIMESTEPS, STUDENT_WEIGHTS, student_timesteps, student_weights
    assert student_weights() is STUDENT_WEIGHTS == (0.7, 0.1, 0.1, 0.1)
    assert student_weights(0.85) == pytest.approx((0.85, 0.05, 0.05, 0.05))
    for share, weights in ((0.7, STUDENT_WEIGHTS), (0.85, (0.85, 0.05, 0.05, 0.05))):  # a share gives the same draws
        # as its weights written out: 0.7 is the recipe's student, 0.85 the one-process recipe's (docs/SHAPES.md)
        idx = torch.multinomial(torch.tensor(weights), 64, replacement=True, generator=generator(3))
        assert torch.equal(student_timesteps(64, generator(3), share), torch.tensor(STUDENT_TIMESTEPS)[idx])
    assert student_timesteps(64, generator(3), 1.0).tolist() == [999] * 64
    drawn = student_timesteps(20000, generator(3), 0.4)
    shares = [(drawn == t).float().mean().item() for t in STUDENT_TIMESTEPS]
    assert shares == pytest.approx([0.4, 0.2, 0.2, 0.2], abs=0.015)


def test_student_stage_without_backward_simulation(run, tmp_path):
    """--backward-sim 0: the tiny student stage trains and its weights differ from the recipe's run (backward
    simulation on), whose draws it otherwise shares (there the multi-step rows got the student's own chain)."""
    from safetensors.torch import load_file
    from fewstep.train.recipe import run_stage
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "student"))
    run_stage("student", copy, tiny=True, backward=0.0)
    name = "student/unet/diffusion_pytorch_model.safetensors"
    new, old = load_file(copy / name), load_file(run[0] / name)
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)


def test_student_without_its_pool_names_the_stage(run, tmp_path):
    from fewstep.train.recipe import run_stage
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("checkpoints", "logs", "pool", "student"))
    with pytest.raises(FewstepError, match=r"needs .*pool/pool\.safetensors: run `fewstep train pool"):
        run_stage("student", copy, tiny=True)


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
    SHAPES.md 24th-26th sessions): fp32 latents a little off the fp32 encoder's, same captions; off, exactly fp32."""
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


def test_missing_input_names_the_stage_to_run(tmp_path):
    from fewstep.train.recipe import run_stage
    with pytest.raises(FewstepError, match=r"needs .*tokenizer/vocab\.json: run `fewstep train tokenizer"):
        run_stage("teacher", tmp_path, tiny=True)


def test_shipped_sizes_fit_the_budgets(tmp_path):
    """Teacher + student folders (text encoder and VAE in both) <= 40 MB in fp16; the UNet <= 5M,
    text encoder <= 1.5M and VAE <= 1.5M parameters."""
    from fewstep.models.clip import CLIPTextModel
    from fewstep.models.unet import UNet
    from fewstep.models.vae import AutoencoderKL
    from fewstep.train.clip import text_config
    from fewstep.train.common import count
    from fewstep.train.sizes import FULL
    from fewstep.train.tokenizer import captions, clip_vocab, learn_merges, save
    merges = learn_merges(captions(0, 2000), 1024)
    save(tmp_path, clip_vocab(merges), merges)
    with torch.device("meta"):
        unet, vae, text = UNet(FULL.unet), AutoencoderKL(FULL.vae), CLIPTextModel(text_config(FULL, tmp_path))
    n = {name: count(m) for name, m in (("unet", unet), ("vae", vae), ("text", text))}
    assert n["unet"] <= 5.0e6 and n["text"] <= 1.5e6 and n["vae"] <= 1.5e6, n
    assert 2 * 2 * sum(n.values()) <= 40e6, n


def test_training_device_choice(monkeypatch):
    """Training goes to the GPU when there is one, unless the CPU is asked for (ACCELERATE_USE_CPU, which
    `fewstep train --cpu` sets, as `accelerate launch --cpu` does); without a GPU it is a CPU run, said
    explicitly so that several processes train over gloo. The Accelerator is told so."""
    import accelerate

    from fewstep.train import common
    from fewstep.train.cli import main
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.on_cpu() is False
    seen = []

    class Fake:
        num_processes = 1

        def __init__(self, cpu=False):
            seen.append(cpu)

    monkeypatch.setattr(accelerate, "Accelerator", Fake)
    common.make_accelerator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.on_cpu() is True
    common.make_accelerator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["clip", "--out", "/nonexistent/run", "--cpu"]) == 2  # fails on its missing input, after --cpu
    assert os.environ["ACCELERATE_USE_CPU"] == "true" and common.on_cpu() is True
    common.make_accelerator()
    assert seen == [False, True, True]


def test_training_steps_keep_to_the_batch_device(run, monkeypatch):
    """Every tensor a training step makes (timesteps, noise, the schedule, the empty caption, the frozen
    teacher) goes to the device of the batch and models: run on the meta device, any tensor left on the CPU
    would make the step fail. Draws are made on the CPU from the step's generator, so they are the same
    numbers on any device; `to_device` moves a batch's tensors and leaves its seeds and captions."""
    from fewstep.loading.folders import load_text_encoder, load_unet
    from fewstep.train.common import to_device
    from fewstep.schedules import alphas_cumprod
    from fewstep.train.export import TRAIN_SCHEDULE
    from fewstep.train.teacher import Conditioned, denoising_loss
    import torch.fx.experimental._config as fx_config
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # boolean indexing on meta tensors
    meta = torch.device("meta")
    batch = to_device({"latents": torch.randn(4, 4, 8, 8), "hidden": torch.randn(4, 32, 32), "seed": 5,
                       "captions": ["a red circle"] * 4, "swap_index": torch.tensor([1, 2]),
                       "swap_hidden": torch.randn(2, 32, 32), "context": torch.randn(4, 32, 32),
                       "pooled": torch.randn(4, 32)}, meta)
    assert batch["latents"].device == meta and batch["seed"] == 5 and batch["captions"][0] == "a red circle"
    teacher = load_unet(run[0] / "swap" / "unet")
    joint = Conditioned(copy.deepcopy(teacher), load_text_encoder(run[0] / "swap" / "text_encoder"), 1).to(meta)
    with OneDevice() as check:
        loss, mse, contrast = denoising_loss(joint, batch, alphas_cumprod(TRAIN_SCHEDULE).to(meta), 0.1, swap=1.0)
    assert loss.device == meta and contrast.device == meta and check.mixed == []

    add = bare_add(teacher, copy.deepcopy(teacher), meta)
    x0_hat = torch.randn(4, 4, 8, 8, device=meta, requires_grad=True)
    with OneDevice() as check:
        adv, distill, (fake, real) = add.generator_losses(x0_hat, batch, torch.Generator().manual_seed(0))
    assert adv.device == distill.device == real[0].device == meta and check.mixed == []
    assert add.teacher.conv_in.weight.device == meta and add.ac.device == meta and add.empty.device == meta


def bare_add(teacher: torch.nn.Module, student: torch.nn.Module, device: torch.device):
    """An ADD on `device` without a Stage: the little of a Stage and its Accelerator that ADD uses."""
    from fewstep.train.distill import ADD, Discriminator, feature_channels, feature_side

    class Accel:
        def prepare(self, *objects):
            return [o.to(device) if isinstance(o, torch.nn.Module) else o for o in objects]

        def unwrap_model(self, model):
            return model

    Accel.device = device

    class FakeStage:
        hyper, accel = type("H", (), {"lr": 1e-4})(), Accel()

        def track(self, *objects):
            pass

    disc = Discriminator(feature_channels(teacher), 32, feature_side(teacher))
    return ADD(FakeStage(), teacher, student, disc, torch.zeros(1, 32, 32), 1e-4)


class OneDevice(TorchDispatchMode):
    """Records each operator that gets tensors (not scalars) on more than one device: meta tensors accept
    CPU ones in many operators, where a GPU tensor would raise."""

    def __init__(self):
        super().__init__()
        self.mixed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = tree_flatten((args, kwargs or {}))[0]
        devices = {a.device.type for a in flat if isinstance(a, torch.Tensor) and a.dim() > 0}
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(devices)}")
        return func(*args, **(kwargs or {}))
