"""Where training runs: a stage data-parallel over 2 CPU processes, the settings launched processes get, the
stages that train on several processes, the choice of device, and every tensor of a training step on the
batch's device."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fewstep.train.recipe import accelerate_launch
from helpers.env import ROOT
from helpers.train import bare_add


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
    launcher = accelerate_launch(2) if stage == "vae" else [sys.executable]
    cmd = [*launcher, "-m", "fewstep.train.cli", stage, "--out", str(out), "--tiny"]
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
    """The full recipe's default (docs/training.md, since 2026-12-05): the UNet stages on 2 CPU processes, the CLIP and
    the VAE on one; `--processes 1` (an override) gives one; the tiny smoke settings keep one."""
    from fewstep.train import recipe
    assert {s: recipe.hyper(s, False).processes for s in ("clip", "vae", *recipe.UNET_STAGES)} == {
        "clip": 1, "vae": 1, "teacher": 2, "refine": 2, "pairs": 2, "swap": 2, "student": 2}
    assert recipe.hyper("teacher", False, processes=1).processes == 1
    assert {recipe.hyper(s, True).processes for s in recipe.UNET_STAGES} == {1}
    assert recipe.hyper("teacher", False).steps == 2000


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
