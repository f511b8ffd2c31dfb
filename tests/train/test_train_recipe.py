"""The training recipe (fewstep.train.recipe) end to end on tiny models: every stage writes its outputs and
starts from the last stage's weights, an interrupted stage resumes exactly, a missing input names the stage to
run, and the shipped model's architecture keeps to its size budgets."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError

TRAINED = ("clip", "vae", "teacher", "refine", "pairs", "swap", "student")


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
                                                                              "sampler": "lcm",
                                                                              "prompt_grammar": "shapes"}
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
