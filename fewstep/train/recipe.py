"""The whole shapes-turbo recipe, in order, from nothing to two shippable folders:

    tokenizer -> clip -> vae -> teacher -> refine -> pairs -> swap -> pool -> student -> export (+ evaluation)

1. a CLIP-style BPE tokenizer learned on captions (seconds);
2. a tiny CLIP trained contrastively; its text transformer is frozen from here on;
3. a KL autoencoder, 128x128x3 <-> 16x16x4;
4. the teacher: a latent DDPM UNet with classifier-free guidance and EMA;
5. refine: the teacher fine-tuned with the whole text transformer (all 4 layers) and offset noise;
6. pairs: the refined teacher fine-tuned on mostly two-object scenes with fuller captions;
7. swap: pairs continued with the swap contrast (two objects' places exchanged in the caption must
   denoise worse): the final teacher;
8. pool: that final teacher's samples from known noise, kept where the evaluator reads them right;
9. the student: adversarial diffusion distillation of the final teacher to 1-4 steps, plus regression
   of its one-step samples onto the pool;
10. export: OUT/shapes-teacher and OUT/shapes-turbo (diffusers layout, fp16), then both are scored
   with the shapes evaluator; the numbers go to OUT/report.json.

Every stage reads what the earlier ones wrote under OUT and is resumable (`resume=True` continues a
stage from its checkpoint, and `all` skips stages whose output already exists).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import FewstepError
from ..pipeline import load_pipeline
from .clip import train_clip
from .common import cpu_count, on_cpu
from .distill import train_student
from .evaluate import evaluate
from .export import STUDENT_SCHEDULER, TEACHER_SCHEDULER, export_pipeline, folder_megabytes
from .loop import Hyper
from .pool import POOL_SIZE, make_pool
from .runs import teacher_folder
from .sizes import SETTINGS, sizes
from .teacher import pairs_teacher, refine_teacher, swap_teacher, train_teacher
from .tokenizer import train_tokenizer
from .vae import train_vae

# Sampling defaults written to each exported folder's fewstep.json, chosen by scripts/measure/sampler_study.py
# and `fewstep eval` (docs/shapes.md, "Sampling defaults"). The teacher: Euler ancestral, whose fresh noise
# each step corrects what the deterministic samplers keep, at guidance 5 (the distillation target's scale,
# teacher.GUIDANCE), which tied or beat 4 and 6 on the final teacher.
TEACHER_DEFAULTS = {"steps": 25, "guidance": 5.0, "sampler": "euler_a", "prompt_grammar": "shapes"}  # teacher.GUIDANCE
# The student: 4 steps of LCM's sampler (jump to x0, re-noise with fresh noise), the very move ADD trains
# it on; 4 steps beat Euler at 4 steps, and 2 and 1 steps.
STUDENT_DEFAULTS = {"steps": 4, "guidance": 0.0, "sampler": "lcm", "prompt_grammar": "shapes"}


def hyper(stage: str, tiny: bool, scale: float = 1.0, **overrides) -> Hyper:
    """A stage's settings: the defaults of sizes.SETTINGS, steps scaled by `scale`, then the
    overrides that are not None (steps, batch, lr, workers, stop_at)."""
    h = SETTINGS["tiny" if tiny else "full"][stage]
    h = replace(h, steps=max(1, round(h.steps * scale)))
    return replace(h, **{k: v for k, v in overrides.items() if v is not None})


def run_stage(stage: str, out: Path, tiny: bool = False, seed: int = 0, resume: bool = False,
              evaluate_n: int = 200, **overrides) -> dict:
    """Run one stage; returns what it reports (wall time, and accuracies for export)."""
    out, t0, spec = Path(out), time.perf_counter(), RECIPE[stage]
    _require(out, stage, init=overrides.get("init") is not None)
    report = {}
    if spec.train is None:  # one process's work, also under `accelerate launch`
        from accelerate import PartialState  # lazy: optional (pip install 'fewstep[train]')
        state = PartialState(cpu=on_cpu())
        if state.is_main_process:
            torch.set_num_threads(cpu_count())
            report.update(spec.run(out, tiny, seed, evaluate_n))
        state.wait_for_everyone()
    else:
        h = hyper(stage, tiny, **overrides)
        if h.processes > 1 and on_cpu() and not launched():
            launch(stage, out, tiny, seed, resume, h)
        else:
            report.update(spec.train(out, sizes(tiny), h, seed, resume) or {})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _tokenizer_stage(out: Path, tiny: bool, seed: int, evaluate_n: int) -> dict:
    vocab = train_tokenizer(out / "tokenizer", seed=seed, n=2000 if tiny else 20000, max_length=sizes(tiny).context)
    return {"vocab": len(vocab)}


def _pool_stage(out: Path, tiny: bool, seed: int, evaluate_n: int) -> dict:
    return make_pool(out, POOL_SIZE["tiny" if tiny else "full"], seed)


def launched() -> bool:
    """Whether this process is one of several a launcher started (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the launch's rendezvous: torchrun's default 29500 may be held by
    another run on this machine, or by the launch before it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int) -> list[str]:
    """The start of an `accelerate launch` command line for `processes` CPU (or GPU) processes on this machine,
    rendezvous on a free port; the module to run and its arguments follow."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def launch_command(stage: str, out: Path, tiny: bool, seed: int, resume: bool, h: Hyper) -> list[str]:
    """`accelerate launch` of `fewstep.train.cli STAGE` as h.processes CPU processes with the settings of `h`
    (steps already scaled), each making its own share of the batch on its own core (no data worker)."""
    cmd = [*accelerate_launch(h.processes), "-m", "fewstep.train.cli", stage, "--out", str(out), "--cpu",
           "--workers", "0", "--processes", "1", "--seed", str(seed),
           "--steps", str(h.steps), "--batch", str(h.batch), "--lr", repr(h.lr)]
    flags = [("--stop-at", h.stop_at)]
    if stage in TEACHER_STAGES:
        flags += [("--text-layers", h.text_layers), ("--offset-noise", h.offset_noise), ("--init", h.init),
                  ("--two-objects", h.two_objects), ("--caption-drop", h.caption_drop), ("--swap", h.swap)]
    elif stage == "student":
        flags += [("--two-objects", h.two_objects), ("--caption-drop", h.caption_drop), ("--backward-sim", h.backward),
                  ("--one-step", h.one_step)]
    cmd += [str(x) for flag, value in flags if value is not None for x in (flag, value)]
    return cmd + ["--tiny"] * tiny + ["--resume"] * resume


def launch(stage: str, out: Path, tiny: bool, seed: int, resume: bool, h: Hyper) -> None:
    """Train a stage as h.processes data-parallel CPU processes (`launch_command`); they print their own progress."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_LAUNCHED": "1"}  # threads: make_accelerator sets them
    done = subprocess.run(launch_command(stage, out, tiny, seed, resume, h), env=env)
    if done.returncode:
        raise FewstepError(f"stage '{stage}' stopped in its {h.processes} processes (exit code {done.returncode}); "
                           "their error is above")


def _require(out: Path, stage: str, init: bool = False) -> None:
    """The outputs of the earlier stages this one reads, or a one-line error naming the stage to run. With
    `init` (--init DIR) refine, pairs and swap fine-tune DIR, so they need no earlier teacher stage in OUT."""
    spec = RECIPE[stage]
    for earlier in BASE if init and spec.teacher else spec.needs:
        if not (out / RECIPE[earlier].output).is_file():
            raise FewstepError(f"stage '{stage}' needs {out / RECIPE[earlier].output}: run `fewstep train {earlier} "
                               f"--out {out}` first (or `fewstep train all`)")


def export_and_score(out: Path, tiny: bool, seed: int = 0, n: int = 200) -> dict:
    """Write OUT/shapes-teacher and OUT/shapes-turbo, load them as `fewstep.load` does, score the teacher at
    its defaults and the student at 1 step (`student`) and 4 (`student_4_steps`)."""
    folders = {"teacher": export_pipeline(out, teacher_folder(out) / "unet", out / "shapes-teacher", TEACHER_SCHEDULER,
                                          TEACHER_DEFAULTS),
               "student": export_pipeline(out, out / "student" / "unet", out / "shapes-turbo", STUDENT_SCHEDULER,
                                          STUDENT_DEFAULTS)}
    report = {f"{k}_mb": round(folder_megabytes(v), 2) for k, v in folders.items()}
    if n <= 0 or tiny:
        return report
    for name, folder in folders.items():
        pipe = load_pipeline(folder)
        one_step = {"steps": 1} if name == "student" else {}  # the student's own default is 4 steps (below)
        report[name] = evaluate(pipe, n, clip_folder=out / "clip", sheet=out / "samples" / f"{name}.png", **one_step)
        if name == "student":
            report["student_4_steps"] = evaluate(pipe, n, steps=4, sheet=out / "samples" / "student-4.png")
        print(f"{name}: {report[name]}", flush=True)
    return report


def run_all(out: Path, tiny: bool = False, seed: int = 0, resume: bool = False, scale: float = 1.0,
            workers: int | None = None, evaluate_n: int = 200, processes: int | None = None) -> dict:
    """Every stage in order (skipping finished ones when resuming); writes OUT/report.json. With `processes`,
    the UNet stages (the four teacher stages and the student: most of the recipe's time) train as that many
    data-parallel processes on the CPU; the CLIP and the VAE keep one (so they give the shipped ones)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    report = json.loads(path.read_text()) if resume and path.is_file() else {}
    for stage in STAGES:
        if resume and (out / RECIPE[stage].output).is_file() and stage in report:
            continue
        extra = {} if stage in ONE_PROCESS else {"scale": scale, "workers": workers}
        if stage in UNET_STAGES:
            extra["processes"] = processes
        report[stage] = run_stage(stage, out, tiny, seed, resume, evaluate_n, **extra)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class StageSpec:
    """One stage of the recipe: the file whose presence means it is done, the stages whose outputs it reads,
    and what runs it: `train(out, sizes, hyper, seed, resume)` for a training stage (optimiser steps,
    a `Hyper`, accelerate processes), else `run(out, tiny, seed, evaluate_n)` in the main process."""

    output: str
    needs: tuple[str, ...]
    train: Callable | None = None
    run: Callable | None = None
    teacher: bool = False  # a `train_teacher` stage: takes the teacher options (--init, --swap, ...)


UNET = "unet/diffusion_pytorch_model.safetensors"
BASE = ("tokenizer", "clip", "vae")  # what every UNet stage reads
RECIPE: dict[str, StageSpec] = {
    "tokenizer": StageSpec("tokenizer/vocab.json", (), run=_tokenizer_stage),
    "clip": StageSpec("clip/text_encoder/model.safetensors", ("tokenizer",), train_clip),
    "vae": StageSpec("vae/diffusion_pytorch_model.safetensors", (), train_vae),
    "teacher": StageSpec(f"teacher/{UNET}", BASE, train_teacher, teacher=True),
    "refine": StageSpec(f"refine/{UNET}", (*BASE, "teacher"), refine_teacher, teacher=True),
    "pairs": StageSpec(f"pairs/{UNET}", (*BASE, "refine"), pairs_teacher, teacher=True),
    "swap": StageSpec(f"swap/{UNET}", (*BASE, "pairs"), swap_teacher, teacher=True),
    "pool": StageSpec("pool/pool.safetensors", (*BASE, "swap"), run=_pool_stage),
    "student": StageSpec(f"student/{UNET}", (*BASE, "swap", "pool"), train_student),
    "export": StageSpec("shapes-turbo/model_index.json", (*BASE, "swap", "student"), run=export_and_score),
}
STAGES = tuple(RECIPE)
TEACHER_STAGES = tuple(name for name, s in RECIPE.items() if s.teacher)
UNET_STAGES = (*TEACHER_STAGES, "student")  # what `all --processes N` runs on N processes
ONE_PROCESS = tuple(name for name, s in RECIPE.items() if s.train is None)  # no optimiser steps, no Hyper
