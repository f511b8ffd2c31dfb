"""The training loop every stage runs: progress bar, loss log (JSON lines + a loss-curve PNG),
checkpoints with `Accelerator.save_state` and exact resume from them.

A stage owns `OUT/checkpoints/STAGE/` (the latest checkpoint, replaced atomically) and
`OUT/logs/STAGE.jsonl` / `STAGE.png`. Resuming loads the checkpoint (models, optimizers, the step
counter, EMA and anything else registered) and drops logged rows past its step, so a log never
holds two versions of a step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from .common import Counter, cpu_count, make_accelerator, to_device


@dataclass
class Hyper:
    """A stage's run settings (defaults in recipe.SETTINGS; the CLI can override steps / batch / lr)."""

    steps: int
    batch: int  # global batch: split over the processes
    lr: float
    warmup: int = 100
    log_every: int = 25
    ckpt_every: int = 500
    workers: int = 0  # data worker processes (0 or 1): rendering and frozen encoders run there
    stop_at: int | None = None  # end this invocation after this step, checkpointed, as a kill would (time slices)
    preview_every: int = 0  # write OUT/samples/STAGE-STEP.png every so many steps (0: never)
    text_layers: int = 0  # teacher: the text encoder's last layers trained with the UNet (0: frozen CLIP)
    offset_noise: float = 0.0  # teacher: std of the per-image, per-channel constant added to the noise
    init: str | None = None  # teacher: start from this trained teacher (its unet/ and text_encoder/), not random
    two_objects: float = 0.5  # teacher stages (teacher ... swap), student: fraction of training scenes with two objects
    caption_drop: float = 0.3  # teacher stages, student: probability each optional caption part is left out
    swap: float = 0.0  # teacher stages: weight of the swap contrast (teacher.denoising_loss; 0: off)
    pool: bool = False  # student: regress one-step samples onto the teacher's pool (train/pool.py)
    backward: float = 0.0  # student: share of multi-step rows fed the student's own sampling chain (0: off)
    one_step: float | None = None  # student: share of batch rows drawn at t = 999, the rest evenly at 749 / 499 / 249
    # (None: distill.STUDENT_WEIGHTS)
    processes: int = 1  # on the CPU, `fewstep train` runs the stage as this many data-parallel processes
    # (recipe.launch: accelerate launch, gradients averaged over gloo; each makes its share of the batch, no worker)


class LossLog:
    """Loss rows as JSON lines, and a plot of them."""

    def __init__(self, path: Path):
        self.path = path

    def truncate(self, step: int) -> None:
        """Keep only rows up to `step` (a resumed run logs the later ones again)."""
        if self.path.is_file():
            rows = [r for r in self.rows() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, title: str) -> Path | None:
        """The loss curves as OUT/logs/STAGE.png (skipped when matplotlib is not installed)."""
        try:  # lazy: matplotlib is optional (pip install 'fewstep[train]')
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # (after choosing the file backend)
        except ImportError:
            return None
        rows = self.rows()
        keys = [k for k in (rows[0] if rows else {}) if k not in ("step", "lr", "time")]
        if not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            steps = [r["step"] for r in rows if key in r]
            ax.plot(steps, [r[key] for r in rows if key in r], lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            if all(r[key] > 0 for r in rows if key in r):
                ax.set_yscale("log")
        fig.suptitle(title)
        fig.tight_layout()
        out = self.path.with_suffix(".png")
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out


class Stage:
    """One stage's Accelerator, step counter, checkpoint folder and log."""

    def __init__(self, name: str, out: Path, hyper: Hyper, seed: int):
        self.name, self.out, self.hyper, self.seed = name, Path(out), hyper, seed
        self.accel = make_accelerator(hyper.workers)
        self.counter = Counter()
        self.accel.register_for_checkpointing(self.counter)
        self.ckpt = self.out / "checkpoints" / name
        self.log = LossLog(self.out / "logs" / f"{name}.jsonl")
        world = self.accel.num_processes
        if hyper.batch % world:
            raise FewstepError(f"--batch {hyper.batch} does not split over {world} processes")
        self.per_process = hyper.batch // world

    @property
    def rank(self) -> int:
        return self.accel.process_index

    @property
    def main(self) -> bool:
        return self.accel.is_main_process

    def track(self, *objects) -> None:
        """Objects with state_dict / load_state_dict (EMA, discriminator state) to checkpoint too."""
        for obj in objects:
            self.accel.register_for_checkpointing(obj)

    def restore(self, resume: bool) -> int:
        """Load the checkpoint when resuming and one exists; returns the step to start from."""
        if resume and self.ckpt.is_dir():
            self.accel.load_state(str(self.ckpt))
        if self.main:
            self.log.truncate(self.counter.step)
        return self.counter.step

    def save(self) -> None:
        """Write the checkpoint to a fresh folder, then swap it in: a kill mid-save keeps the old one."""
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        if self.main and tmp.exists():
            shutil.rmtree(tmp)
        self.accel.wait_for_everyone()
        self.accel.save_state(str(tmp))
        self.accel.wait_for_everyone()
        if self.main:
            if self.ckpt.exists():
                shutil.rmtree(self.ckpt)
            tmp.rename(self.ckpt)
        self.accel.wait_for_everyone()

    def run(self, data: Iterable[dict], step_fn: Callable[[int, dict], dict[str, float]],
            on_preview: Callable[[int], None] | None = None) -> bool:
        """step_fn(step, batch) -> losses, for the remaining steps; logs, checkpoints, plots, and
        calls on_preview(step) every `preview_every` steps (main process only).
        Returns whether the stage is complete (False when `stop_at` ended it early)."""
        h, start = self.hyper, self.counter.step
        stop = h.steps if h.stop_at is None else min(h.steps, h.stop_at)
        bar = tqdm(total=h.steps, initial=start, desc=self.name, disable=not self.main, dynamic_ncols=True,
                   mininterval=2.0)
        c = self.counter
        t0 = time.perf_counter() - c.seconds  # the log's time column counts the whole stage, resumes included
        for step, batch in zip(range(start, stop), data):
            losses = step_fn(step, to_device(batch, self.accel.device))
            for k, v in losses.items():
                c.sums[k] = c.sums.get(k, 0.0) + float(v)
            c.n += 1
            c.step = step + 1
            bar.update(1)
            if (step + 1) % h.log_every == 0 or step + 1 == h.steps:
                self._log(step + 1, {k: v / c.n for k, v in c.sums.items()}, time.perf_counter() - t0, bar)
                c.sums, c.n = {}, 0
            if on_preview is not None and h.preview_every and (step + 1) % h.preview_every == 0 and self.main:
                on_preview(step + 1)
            c.seconds = time.perf_counter() - t0
            if (step + 1) % h.ckpt_every == 0 and step + 1 < h.steps:
                self.save()
        bar.close()
        torch.set_num_threads(max(1, cpu_count() // self.accel.num_processes))  # the data worker is done
        self.save()
        if self.main:
            self.log.plot(f"{self.name}: {h.steps} steps, batch {h.batch}")
        return self.counter.step >= h.steps

    def _log(self, step: int, means: dict, elapsed: float, bar) -> None:
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
        values = self.accel.reduce(values, "mean") if self.accel.num_processes > 1 else values
        row = {"step": step, **{k: round(float(v), 6) for k, v in zip(keys, values)}, "time": round(elapsed, 1)}
        if self.main:
            self.log.append(row)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in keys})
