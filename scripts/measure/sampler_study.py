"""Sampler study on a shapes model: accuracy against UNet evaluations for each sampler and step count.

For each SAMPLER:STEPS,STEPS,... of --runs the fixed, seeded shapes eval set (--n prompts,
`fewstep.shapes.caption.sample_prompts`, the set `fewstep eval` uses) is generated from the same
initial noise and read back by the shapes evaluator (`fewstep.shapes.metrics.evaluate`): one- and
two-object accuracy, tiny-CLIP score and Fréchet distance (the shipped shapes-clip scorer, the same
reference renders as `fewstep eval`), and the UNet evaluations each image took, counted with a
forward hook (classifier-free guidance runs its two halves in one batched call, which counts once).
Prints Markdown for a docs/log/ entry; --plot writes accuracy against UNet evaluations as a PNG.

    python scripts/measure/sampler_study.py [--model PATH] [--runs "euler:10,25 dpmpp_2m:10,25 heun:13"]
                                  [--n 500] [--guidance G] [--threads T] [--plot docs/sampler-study.png]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def parse_runs(text: str) -> list[tuple[str, int]]:
    """'euler:10,25 heun:13' -> [('euler', 10), ('euler', 25), ('heun', 13)]."""
    from fewstep.samplers import SAMPLERS
    runs = []
    for item in text.split():
        name, _, steps = item.partition(":")
        if name not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
        try:
            runs += [(name, int(s)) for s in steps.split(",")]
        except ValueError:
            raise SystemExit(f"error: {item!r}: write SAMPLER:STEPS[,STEPS...], e.g. euler:10,25") from None
    if not runs:
        raise SystemExit("error: --runs names no sampler")
    return runs


def study(pipe, runs: list[tuple[str, int]], prompts: list[str], seed: int = 0, clip=None, reference=None,
          batch: int = 16, guidance: float | None = None) -> list[tuple[str, int, float, object]]:
    """(sampler, steps, UNet evaluations per image, EvalResult) for each run, same prompts and seeds."""
    from fewstep.shapes.metrics import evaluate
    calls = [0]
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batches = -(-len(prompts) // batch)
    rows = []
    try:
        for name, steps in runs:
            print(f"{name} {steps} steps ...", file=sys.stderr, flush=True)
            calls[0] = 0
            r, _ = evaluate(pipe, prompts, steps, seed, clip, reference, batch=batch, sampler=name, guidance=guidance)
            rows.append((name, steps, calls[0] / batches, r))
    finally:
        hook.remove()
    return rows


def plot(rows, title: str, path: Path) -> None:
    """One panel per prompt kind (one object, two objects): accuracy against UNet evaluations, a line
    per sampler."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    names = list(dict.fromkeys(r[0] for r in rows))
    for ax, kind, label in ((axes[0], "one", "one-object prompts"), (axes[1], "two", "two-object prompts")):
        for i, name in enumerate(names):
            pts = sorted((nfe, 100 * getattr(r, kind)) for n, _, nfe, r in rows if n == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=name)
        ax.set_xticks(sorted({r[2] for r in rows}))
        ax.set_xlabel("UNet evaluations per image")
        ax.set_ylabel("exact accuracy, %")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a shapes model folder (default: the shipped teacher)")
    ap.add_argument("--runs", default="euler:10,25 euler_a:25 heun:13 dpmpp_2m:10,25 ddim:25",
                    help="space-separated SAMPLER:STEPS[,STEPS...]")
    ap.add_argument("--n", type=int, default=500, help="prompts of the seeded eval set")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (e.g. 1 beside a training run)")
    ap.add_argument("--no-clip", action="store_true", help="skip the tiny-CLIP score and Fréchet distance")
    ap.add_argument("--plot", default=None, help="write accuracy against UNet evaluations here (PNG)")
    a = ap.parse_args(argv)
    runs = parse_runs(a.runs)

    import torch

    import fewstep
    from fewstep.shapes.metrics import eval_set
    from fewstep.loading.hub import ASSETS
    model = Path(a.model) if a.model else ASSETS / "shapes-teacher"
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"error: no model at {model}: pass --model (a shapes model folder)")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    pipe = fewstep.load(model)
    prompts, clip, reference = eval_set(a.seed, a.n, not a.no_clip)
    rows = study(pipe, runs, prompts, a.seed, clip, reference, a.batch, a.guidance)
    guidance = pipe.defaults.guidance if a.guidance is None else a.guidance

    from fewstep.bench.report import environment
    env = environment(str(pipe.device), torch.get_num_threads())
    print(f"- Date: {env['date']}. Commit: {env['commit']}. Device: {env['device']}, torch {env['torch']}.")
    print(f"- Command: `python scripts/measure/sampler_study.py {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"- Model: {model.name}, guidance {guidance:g}, {a.n} prompts (seed {a.seed}), same initial noise "
          f"for every run.\n")
    print("| sampler | steps | UNet evaluations | one-object | two-object | tiny-CLIP score | Fréchet dist. |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, steps, nfe, r in rows:
        score = "-" if r.clip_score is None else f"{r.clip_score:.2f}"
        fid = "-" if r.fid is None else f"{r.fid:.3f}"
        print(f"| {name} | {steps} | {nfe:g} | {r.one:.1%} ({r.n_one}) | {r.two:.1%} ({r.n_two}) | {score} | {fid} |")
    if a.plot:
        plot(rows, f"{model.name}, guidance {guidance:g}, {a.n} prompts", Path(a.plot))
        print(f"\n![accuracy against UNet evaluations]({a.plot})")


if __name__ == "__main__":
    main()
