"""Speed of the built-in model on this machine: one 1-step 128x128 image with the model loaded, and
the whole `fewstep generate` command (process start, imports, load, one image, PNG written).

In-process: after two warm-up images, the median of --runs timed images (text encode, one UNet
evaluation, VAE decode, conversion to PIL). Command: --runs fresh `fewstep generate` processes,
wall time each. Targets: <= 0.1 s and <= 4 s. Prints a Markdown table.

    python scripts/measure/default_model_speed.py [--model PATH] [--runs 20] [--command-runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a large red circle on the left and a small blue square at the top right"


def in_process(model: str | None, runs: int) -> list[float]:
    import torch

    import fewstep
    torch.set_grad_enabled(False)
    pipe = fewstep.load(model)
    for _ in range(2):
        pipe(PROMPT, steps=1, progress=False)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        pipe(PROMPT, steps=1, seed=i, progress=False)
        times.append(time.perf_counter() - t)
    return times


def command(model: str | None, runs: int) -> list[float]:
    exe = Path(sys.executable).with_name("fewstep")
    times = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(runs):
            cmd = [str(exe), "generate", PROMPT, "--seed", str(i), "--output", out, "--quiet"]
            cmd += ["--model", model] if model else []
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in model")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--command-runs", type=int, default=5)
    a = ap.parse_args()
    image, whole = in_process(a.model, a.runs), command(a.model, a.command_runs)
    print("| measure | median s | min-max s | runs | target |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| 1-step 128x128 image, model loaded | {statistics.median(image):.4f} | {min(image):.4f}-{max(image):.4f} "
          f"| {len(image)} | <= 0.1 |")
    print(f"| whole `fewstep generate` command | {statistics.median(whole):.2f} | {min(whole):.2f}-{max(whole):.2f} "
          f"| {len(whole)} | <= 4 |")


if __name__ == "__main__":
    main()
