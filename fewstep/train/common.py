"""What every training stage shares: the Accelerator, seeding, the on-the-fly data stream, EMA,
weight init and files (the loop, checkpoints and logs are in loop.py).

Determinism is by construction rather than by saved RNG state: the data of step i on process r is
rendered from a seed made of (run seed, stage, i, r), and every random draw of a step comes from a
generator seeded the same way, so a run resumed from a checkpoint replays the steps a straight run
would have taken. One process by default, on the GPU when there is one (else the CPU; `--cpu`, or `accelerate launch
--cpu`, keeps it on the CPU); `accelerate launch --multi_gpu --num_processes N` (torchrun underneath; on
a machine without GPUs the processes use the CPU and gloo) runs the same code data-parallel, one GPU per
process, each drawing its own share of the global batch. Rendering, the frozen encoders of the data
stream and every random draw stay on the CPU (its generators), and each batch moves to the process's
device: the same seeds give the same data and draws on any device.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

STAGE_IDS = {"clip": 1, "vae": 2, "teacher": 3, "student": 4, "refine": 5, "pairs": 6, "pool": 7, "swap": 8,
             "lora": 9, "controlnet": 10}


def seed_for(seed: int, stage: str, step: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for one (run, stage, step, process)."""
    return int(np.random.SeedSequence([seed, STAGE_IDS[stage], step, rank]).generate_state(2, np.uint64)[0] >> 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def on_cpu() -> bool:
    """Whether training runs on the CPU: asked for (accelerate's ACCELERATE_USE_CPU, which `fewstep train --cpu`
    and `accelerate launch --cpu` set) or no GPU. Told explicitly, not left to accelerate: several processes
    without a GPU must still know they are CPU processes, or they would each train alone instead of over gloo."""
    from accelerate.utils import parse_flag_from_env  # lazy: optional (pip install 'fewstep[train]')
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def make_accelerator(workers: int = 0):
    """The Accelerator: a GPU per process where there are GPUs, unless the CPU is asked for (`fewstep
    train --cpu` or `accelerate launch --cpu`, both by accelerate's ACCELERATE_USE_CPU), with torch threads
    split between the processes and their data workers: oversubscribed OpenMP threads spin, and run
    several times slower than the same work on fewer threads."""
    from accelerate import Accelerator  # lazy: optional (pip install 'fewstep[train]')
    accel = Accelerator(cpu=on_cpu())
    torch.set_num_threads(max(1, cpu_count() // accel.num_processes - workers))
    return accel


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (the rest, such as seeds and captions, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Stream(torch.utils.data.IterableDataset):
    """make(step) for each step in [start, stop): rendering and frozen encoders, in a worker."""

    def __init__(self, make: Callable[[int], dict], start: int, stop: int):
        super().__init__()
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self):
        return (self.make(step) for step in range(self.start, self.stop))


def batches(make: Callable[[int], dict], start: int, stop: int, workers: int = 0) -> Iterable[dict]:
    """The stage's batches from `start`; with one worker process they are made while the model trains."""
    if workers == 0:
        return (make(step) for step in range(start, stop))
    return torch.utils.data.DataLoader(Stream(make, start, stop), batch_size=None, num_workers=1, prefetch_factor=4)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_weights(state_dict: dict, path: Path, dtype: torch.dtype | None = None) -> None:
    """A safetensors file of contiguous CPU tensors (floats cast to `dtype` when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in state_dict.items()}
    save_file(sd, str(path))


def init_weights(model: nn.Module, zero: tuple[str, ...] = ("conv2",)) -> nn.Module:
    """Variance-preserving init for convs and linears (normal, std 1 / sqrt(fan_in)), zero biases,
    and zero weights for layers whose name ends with one of `zero` (the last conv of each residual
    branch, as in ADM / Goyal et al. 2017), so each block starts as the identity. PyTorch's default
    shrinks activations ~3x per plain conv: an autoencoder's chain of resampling convs then starts
    out near-constant and learns colours slowly."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if name.endswith(zero):
                nn.init.zeros_(m.weight)
    return model


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), with the usual warm-up
    (decay grows as (1 + step) / (10 + step)) so early weights are not frozen in."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of `model` (same architecture as the averaged one) holding the averaged weights, in
        eval mode: what previews sample from."""
        averaged = copy.deepcopy(model).eval().requires_grad_(False)
        averaged.load_state_dict(self.shadow)
        return averaged

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        for k, v in self.shadow.items():
            v.copy_(sd[k])


class Counter:
    """The step counter and the loss sums not yet logged, saved with the checkpoint (so a resumed
    run logs the same rows as a straight one)."""

    def __init__(self):
        self.step, self.n, self.sums, self.seconds = 0, 0, {}, 0.0  # seconds: training time before this run

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step), "n": torch.tensor(self.n), "seconds": torch.tensor(self.seconds),
                **{f"sum/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.sums.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.n, self.seconds = int(sd["step"]), int(sd.get("n", 0)), float(sd.get("seconds", 0.0))
        self.sums = {k[4:]: float(v) for k, v in sd.items() if k.startswith("sum/")}


def warmup_lr(step: int, lr: float, warmup: int, total: int, decay: bool = True) -> float:
    """Linear warm-up, then cosine decay to 10% (or constant when not `decay`)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if not decay:
        return lr
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def target(b: dict, ac: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What a denoising model predicts for batch `b` (latents, noise, timesteps t) under the cumulative
    alphas `ac`: the noise, v = sqrt(a) noise - sqrt(1 - a) x0, or x0."""
    if prediction_type == "epsilon":
        return b["noise"]
    if prediction_type == "sample":
        return b["latents"]
    a = ac[b["t"]].view(-1, 1, 1, 1)
    return a.sqrt() * b["noise"] - (1 - a).sqrt() * b["latents"]


def descend(accel, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> dict:
    """One optimizer step on `loss` (through accelerate, which reduces gradients over processes); the
    step's log entry."""
    accel.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss.detach()}
