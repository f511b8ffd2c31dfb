"""DeepCache and weight quantization on a multi-step model: speed-up and shapes accuracy at 25 steps.

For each interval of --intervals (1 = no cache, the baseline) the fixed, seeded shapes eval set (--n
prompts, `fewstep.shapes.caption.sample_prompts`) is generated at --steps with
`fewstep.speed.deepcache.DeepCache(interval, --branch)` and read back by the shapes evaluator
(`fewstep.shapes.metrics.evaluate`): images/s, speed-up over the baseline, one- and two-object accuracy,
the tiny-CLIP Fréchet distance to renderer images (the shipped shapes-clip scorer, the same
reference set as `fewstep eval`), and the PSNR of the whole set against the uncached images of the
same seeds. The model defaults to the shipped teacher (fewstep/assets/shapes-teacher), a 25-step
DDPM-trained shapes model. Each --quantize scheme (`fewstep.speed.quantize`, torchao) adds a row: a fresh
load, quantized, no cache, against the same uncached baseline; so does each --token-downsample factor
(ToDo, `fewstep.load(token_downsample=F)`). Prints Markdown for docs/BENCHMARKS.md.

    python scripts/measure/deepcache.py [--model PATH] [--steps 25] [--intervals 1,2,3,4,5] [--branch 0] [--n 200]
                              [--quantize int8-weight,int8-dynamic] [--token-downsample 2]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a multi-step model folder (default: the shipped shapes teacher)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--intervals", default="1,2,3,4,5", help="comma-separated; 1 means no cache")
    ap.add_argument("--branch", type=int, default=0, help="DeepCache skip branch (0 caches the most)")
    ap.add_argument("--n", type=int, default=200, help="prompts of the seeded eval set")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize", default="", help="comma-separated fewstep.speed.quantize schemes, one row each")
    ap.add_argument("--token-downsample", default="", help="comma-separated ToDo factors, one row each")
    a = ap.parse_args()

    import torch

    import fewstep
    from fewstep.loading.hub import ASSETS
    model = Path(a.model) if a.model else ASSETS / "shapes-teacher"
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"no model at {model}: pass --model (a multi-step model folder, e.g. RUN/shapes-teacher)")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    pipe = fewstep.load(model)
    rows = measure(pipe, a, model)
    print_markdown(pipe, model, rows, a)


def measure(pipe, a: argparse.Namespace, model: Path) -> list[tuple]:
    """(label, EvalResult, PSNR vs the uncached images) per interval, interval 1 (no cache) first, then
    per quantization scheme."""
    import numpy as np

    from fewstep.bench.harness import psnr
    from fewstep.speed.deepcache import DeepCache
    from fewstep.shapes.metrics import eval_set, evaluate
    prompts, clip, reference = eval_set(a.seed, a.n)  # as `fewstep eval` does
    evaluate(pipe, prompts[:min(a.batch, a.n)], a.steps, a.seed, batch=a.batch)  # warm-up
    rows, base = [], None
    for interval in sorted({int(i) for i in a.intervals.split(",")} | {1}):
        cache = None if interval == 1 else DeepCache(interval, a.branch)
        print(f"interval {interval} ...", file=sys.stderr, flush=True)
        r, images = evaluate(pipe, prompts, a.steps, a.seed, clip, reference, batch=a.batch, cache=cache)
        base = images if base is None else base
        rows.append((str(interval), r, psnr(np.asarray(images), np.asarray(base))))
    import fewstep
    from fewstep.speed.quantize import quantize
    variants = [(s, lambda s=s: quantize(fewstep.load(model), s)) for s in filter(None, a.quantize.split(","))]
    variants += [(f"ToDo {f}x{f}", lambda f=int(f): fewstep.load(model, token_downsample=f))
                 for f in filter(None, a.token_downsample.split(","))]
    for label, make in variants:
        print(f"{label} ...", file=sys.stderr, flush=True)
        q = make()
        evaluate(q, prompts[:min(a.batch, a.n)], a.steps, a.seed, batch=a.batch)  # warm-up
        r, images = evaluate(q, prompts, a.steps, a.seed, clip, reference, batch=a.batch)
        rows.append((f"1, {label}", r, psnr(np.asarray(images), np.asarray(base))))
    return rows


def print_markdown(pipe, model: Path, rows: list[tuple], a: argparse.Namespace) -> None:
    import torch

    from fewstep.bench.report import environment
    env = environment("cpu" if pipe.device.type == "cpu" else str(pipe.device), torch.get_num_threads())
    print(f"- Date: {env['date']}. Commit: {env['commit']}. Device: {env['device']}, {env['threads']} torch "
          f"threads, torch {env['torch']}.")
    print(f"- Command: `python scripts/measure/deepcache.py {shlex.join(sys.argv[1:])}`")
    print(f"- Model: {model.name}, {a.steps} steps, guidance {pipe.defaults.guidance:g}, {a.n} prompts "
          f"(seed {a.seed}), batch {a.batch}, DeepCache branch {a.branch}; interval 1 is the plain UNet.\n")
    print("| interval (, quantization) | images/s | speed-up | one-object | two-object | all | Fréchet dist. "
          "| PSNR vs no cache dB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base_ips = rows[0][1].images_per_second
    for interval, r, db in rows:
        both = (r.one * r.n_one + r.two * r.n_two) / max(r.n_one + r.n_two, 1)
        print(f"| {interval} | {r.images_per_second:.2f} | {r.images_per_second / base_ips:.2f}x | {r.one:.1%} "
              f"| {r.two:.1%} | {both:.1%} | {r.fid:.1f} | {'identical' if db == float('inf') else f'{db:.1f}'} |")


if __name__ == "__main__":
    main()
