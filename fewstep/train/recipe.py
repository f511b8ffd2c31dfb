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
import time
from dataclasses import replace
from pathlib import Path

from .loop import Hyper
from .sizes import SETTINGS, sizes

STAGES = ("tokenizer", "clip", "vae", "teacher", "refine", "pairs", "swap", "pool", "student", "export")
OUTPUTS = {"tokenizer": "tokenizer/vocab.json", "clip": "clip/text_encoder/model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors", "teacher": "teacher/unet/diffusion_pytorch_model.safetensors",
           "refine": "refine/unet/diffusion_pytorch_model.safetensors",
           "pairs": "pairs/unet/diffusion_pytorch_model.safetensors",
           "swap": "swap/unet/diffusion_pytorch_model.safetensors",
           "pool": "pool/pool.safetensors",
           "student": "student/unet/diffusion_pytorch_model.safetensors", "export": "shapes-turbo/model_index.json"}
TEACHER_STAGES = ("teacher", "refine", "pairs", "swap")  # the stages that train a teacher (train_teacher)
UNET_STAGES = (*TEACHER_STAGES, "student")  # what `all --processes N` runs on N processes
ONE_PROCESS = ("tokenizer", "pool", "export")  # no optimiser steps: no Hyper, run by the main process
# Sampling defaults written to each exported folder's fewstep.json, chosen by bench/sampler_study.py and
# `fewstep eval` (docs/SHAPES.md, "Sampler study" and "Ninth session"). The teacher: Euler ancestral, whose
# fresh noise each step corrects what the deterministic samplers keep (98.0% / 44.0% one- / two-object
# against Euler's 96.8% / 37.6% on the eighth session's teacher), at guidance 4: on the ninth session's
# teacher it beat 5 (the distillation target, teacher.GUIDANCE) on all three 500-prompt seeds tried, chosen on
# seeds 1 and 2 (98.8 / 52.4 and 98.0 / 50.4 against 98.0 / 48.8 and 97.6 / 49.2); on the tenth session's
# teacher, seed 0: 3: 98.8 / 69.6, 4: 99.2 / 69.6, 5: 98.8 / 67.6. On the twelfth session's (swap) teacher
# 5 ties or beats 4 on both seeds (seed 0: 98.8 / 80.0 against 98.0 / 78.4; seed 1: 98.4 / 85.2 against
# 98.4 / 84.8; 6 on seed 0: 98.4 / 80.0), so the default is now 5, the distillation target's scale as well.
TEACHER_DEFAULTS = {"steps": 25, "guidance": 5.0, "sampler": "euler_a"}  # 5.0: teacher.GUIDANCE
# The student: 4 steps of LCM's sampler (jump to x0, re-noise with fresh noise), the very move ADD trains
# it on (eighth session: 98.8% / 45.6% against Euler's 94.8% / 42.4% at 4 steps; ninth: 94.0 / 45.2 against
# 90.8 / 46.8 on seed 1); 4 steps also beat 2 and 1.
STUDENT_DEFAULTS = {"steps": 4, "guidance": 0.0, "sampler": "lcm"}


def hyper(stage: str, tiny: bool, scale: float = 1.0, **overrides) -> Hyper:
    """A stage's settings: the defaults of sizes.SETTINGS, steps scaled by `scale`, then the
    overrides that are not None (steps, batch, lr, workers, stop_at)."""
    h = SETTINGS["tiny" if tiny else "full"][stage]
    h = replace(h, steps=max(1, round(h.steps * scale)))
    return replace(h, **{k: v for k, v in overrides.items() if v is not None})


def run_stage(stage: str, out: Path, tiny: bool = False, seed: int = 0, resume: bool = False,
              evaluate_n: int = 200, **overrides) -> dict:
    """Run one stage; returns what it reports (wall time, and accuracies for export)."""
    out, t0 = Path(out), time.perf_counter()
    _require(out, stage, init=overrides.get("init") is not None)
    report = {}
    if stage in ONE_PROCESS:  # one process's work, also under `accelerate launch`
        from accelerate import PartialState

        from .common import on_cpu
        state = PartialState(cpu=on_cpu())
        if state.is_main_process and stage == "tokenizer":
            from .tokenizer import train_tokenizer
            report["vocab"] = len(train_tokenizer(out / "tokenizer", seed=seed, n=2000 if tiny else 20000,
                                                   max_length=sizes(tiny).context))
        elif state.is_main_process and stage == "pool":
            import torch

            from .common import cpu_count
            from .pool import POOL_SIZE, make_pool
            torch.set_num_threads(cpu_count())
            report.update(make_pool(out, POOL_SIZE["tiny" if tiny else "full"], seed))
        elif state.is_main_process:
            import torch

            from .common import cpu_count
            torch.set_num_threads(cpu_count())
            report.update(export_and_score(out, tiny, evaluate_n))
        state.wait_for_everyone()
    else:
        from .common import on_cpu
        h = hyper(stage, tiny, **overrides)
        if h.processes > 1 and on_cpu() and not launched():
            launch(stage, out, tiny, seed, resume, h)
        else:
            report.update(_trainer(stage)(out, sizes(tiny), h, seed, resume) or {})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def launched() -> bool:
    """Whether this process is one of several a launcher started (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(stage: str, out: Path, tiny: bool, seed: int, resume: bool, h: Hyper) -> list[str]:
    """`accelerate launch` of `fewstep.train.cli STAGE` as h.processes CPU processes with the settings of `h`
    (steps already scaled), each making its own share of the batch on its own core (no data worker)."""
    import sys
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(h.processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fewstep.train.cli",
           stage, "--out", str(out), "--cpu", "--workers", "0", "--processes", "1", "--seed", str(seed),
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
    import subprocess

    from ..errors import FewstepError
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_LAUNCHED": "1"}  # threads: make_accelerator sets them
    done = subprocess.run(launch_command(stage, out, tiny, seed, resume, h), env=env)
    if done.returncode:
        raise FewstepError(f"stage '{stage}' stopped in its {h.processes} processes (exit code {done.returncode}); "
                           "their error is above")


def _require(out: Path, stage: str, init: bool = False) -> None:
    """The outputs of the earlier stages this one reads, or a one-line error naming the stage to run. With
    `init` (--init DIR) refine, pairs and swap fine-tune DIR, so they need no earlier teacher stage in OUT."""
    from ..errors import FewstepError
    base = ("tokenizer", "clip", "vae")
    needs = {"tokenizer": (), "clip": ("tokenizer",), "vae": (), "teacher": base,
             "refine": base if init else (*base, "teacher"), "pairs": base if init else (*base, "refine"),
             "swap": base if init else (*base, "pairs"), "pool": (*base, "swap"), "student": (*base, "swap", "pool"),
             "export": (*base, "swap", "student")}
    for earlier in needs[stage]:
        if not (out / OUTPUTS[earlier]).is_file():
            raise FewstepError(f"stage '{stage}' needs {out / OUTPUTS[earlier]}: run `fewstep train {earlier} "
                               f"--out {out}` first (or `fewstep train all`)")


def _trainer(stage: str):
    if stage == "clip":
        from .clip import train_clip
        return train_clip
    if stage == "vae":
        from .vae import train_vae
        return train_vae
    if stage == "teacher":
        from .teacher import train_teacher
        return train_teacher
    if stage == "refine":
        from .teacher import refine_teacher
        return refine_teacher
    if stage == "pairs":
        from .teacher import pairs_teacher
        return pairs_teacher
    if stage == "swap":
        from .teacher import swap_teacher
        return swap_teacher
    from .distill import train_student
    return train_student


def export_and_score(out: Path, tiny: bool, n: int) -> dict:
    """Write OUT/shapes-teacher and OUT/shapes-turbo, load them with `fewstep.load`, score the teacher at its
    defaults and the student at 1 step (`student`) and 4 (`student_4_steps`)."""
    from .. import load
    from .evaluate import evaluate
    from .export import STUDENT_SCHEDULER, TEACHER_SCHEDULER, export_pipeline, folder_megabytes
    from .teacher import teacher_folder
    folders = {"teacher": export_pipeline(out, teacher_folder(out) / "unet", out / "shapes-teacher", TEACHER_SCHEDULER,
                                          TEACHER_DEFAULTS),
               "student": export_pipeline(out, out / "student" / "unet", out / "shapes-turbo", STUDENT_SCHEDULER,
                                          STUDENT_DEFAULTS)}
    report = {f"{k}_mb": round(folder_megabytes(v), 2) for k, v in folders.items()}
    if n <= 0 or tiny:
        return report
    for name, folder in folders.items():
        pipe = load(folder)
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
        if resume and (out / OUTPUTS[stage]).is_file() and stage in report:
            continue
        extra = {} if stage in ONE_PROCESS else {"scale": scale, "workers": workers}
        if stage in UNET_STAGES:
            extra["processes"] = processes
        report[stage] = run_stage(stage, out, tiny, seed, resume, evaluate_n, **extra)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report
