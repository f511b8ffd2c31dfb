"""Where a step of the recipe's student stage (ADD + regression pool + backward simulation) spends its time.

Builds the stage as `fewstep train student` does, from a run folder that has its final teacher (RUN/swap) and
pool (RUN/pool), makes the batches first (in training a data worker makes them on the other core), then runs
--steps steps of `distill.ADD.step` with its parts timed by wrapping them: the student's forward over the batch
and pool rows, its backward, the teacher's classifier-free-guided target, the teacher encoder's features for the
discriminator, the gradients at x0_hat, the backward-simulation chains and the discriminator. The first
--warmup steps are not counted. Prints Markdown for a docs/log/ entry. Changes nothing in RUN.

    python scripts/measure/student_step.py --run runs/shapes [--steps 12] [--warmup 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from fewstep.train import distill
from fewstep.train.loop import Stage
from fewstep.train.recipe import hyper
from fewstep.train.sizes import sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder with swap/ and pool/ (fewstep train ... --out RUN)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    run, h = Path(a.run), hyper("student", False)
    if not (run / "pool" / "pool.safetensors").is_file() or not (run / "swap" / "unet").is_dir():
        p.error(f"{run} has no swap/unet or pool/pool.safetensors: run `fewstep train all --out {run}` (or up to pool)")
    times: dict[str, float] = defaultdict(float)
    inside = {"chain": False}

    def timed(name, f):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                if not inside["chain"] or name == CHAIN:
                    times[name] += time.perf_counter() - t0
        return wrapper

    stage = Stage("student-step", Path(tempfile.mkdtemp()), h, 0)
    add, data, _ = distill.student_setup(stage, run, sizes(False), 0)
    batches = [data(i) for i in range(a.steps)]

    chain = timed(CHAIN, add.own_inputs)
    def own_inputs(*args, **kw):
        inside["chain"] = True
        try:
            return chain(*args, **kw)
        finally:
            inside["chain"] = False
    add.own_inputs = own_inputs
    add.target = timed("teacher's guided target (2 x 32 rows)", add.target)
    distill.encoder_features = timed("teacher encoder: fake and real features (forward)", distill.encoder_features)
    add.discriminator_loss = timed("discriminator forward", add.discriminator_loss)
    torch.autograd.grad = timed("gradients at x0_hat (back through the teacher encoder)", torch.autograd.grad)
    backward, calls = stage.accel.backward, [0]
    def timed_backward(loss, **kw):
        calls[0] += 1
        name = "student backward (32 + 8 pool rows)" if calls[0] % 2 else "discriminator backward"
        timed(name, backward)(loss, **kw)
    stage.accel.backward = timed_backward
    clock = {}
    net = stage.accel.unwrap_model(add.model)
    net.register_forward_pre_hook(lambda m, args: clock.__setitem__("t", time.perf_counter()))
    net.register_forward_hook(lambda m, args, out: None if inside["chain"] else times.__setitem__(
        FORWARD, times[FORWARD] + time.perf_counter() - clock["t"]))

    total = 0.0
    for i, b in enumerate(batches):
        if i == a.warmup:
            times.clear()
            total = 0.0
        t0 = time.perf_counter()
        add.step(h.warmup + i, b)
        total += time.perf_counter() - t0
    n = a.steps - a.warmup
    print(f"student step: {total / n:.3f} s (mean of {n}, torch threads {torch.get_num_threads()})\n")
    print("| part | ms a step | share |\n| --- | --- | --- |")
    for name, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {v / n * 1000:.0f} | {100 * v / total:.0f}% |")
    rest = total - sum(times.values())
    print(f"| the rest (optimisers, EMA, losses, clipping, draws) | {rest / n * 1000:.0f} "
          f"| {100 * rest / total:.0f}% |", flush=True)


CHAIN = "backward simulation (the student's own chains, no gradient)"
FORWARD = "student forward (32 + 8 pool rows)"

if __name__ == "__main__":
    main()
