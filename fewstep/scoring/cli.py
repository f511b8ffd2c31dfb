"""`fewstep eval`: the built-in shapes world's evaluator, or any model's batch run scored with CLIP and FID.

Three forms: `fewstep eval [--model SHAPES_MODEL]` (accuracy, tiny-CLIP score, Fréchet distance of the
shapes world; docs/shapes.md), `fewstep eval RUN --clip-model CLIP [--reference DIR] [--by Category]`
(a folder `fewstep generate --from-file` wrote, or makes with --from-file; docs/batch.md), and
`fewstep eval --compare RUN_A RUN_B` (a side-by-side grid and the figures' differences).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..api import load
from ..batch.rows import read_rows
from ..batch.run import run_rows
from ..loading.lora import lora_arg
from ..shapes import control as control_study
from ..shapes import edits as edit_study
from ..shapes.caption import concept_prompts, sample_prompts
from ..shapes.evaluate import failures
from ..shapes.metrics import eval_set, evaluate, markdown, sample_grid
from ..shapes.render import NEW_SHAPES
from .clip import load_clip
from .compare import compare
from .run import markdown as run_markdown
from .run import score_run


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="score a shapes model (accuracy, tiny-CLIP, Fréchet distance), or any "
                              "model's batch run (CLIP score, FID, per category), or compare two runs")
    _eval_args(p)
    runs = p.add_argument_group("any model's batch run (docs/batch.md)")
    runs.add_argument("run", nargs="?", default=None, help="a folder fewstep generate --from-file wrote (with "
                      "--from-file: made here first, resumably)")
    runs.add_argument("--from-file", default=None, metavar="FILE", help="generate RUN from this prompt file with "
                      "--model first (.txt, .jsonl or .tsv; --filter COLUMN=VALUE)")
    runs.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE")
    runs.add_argument("--batch-size", type=int, default=8)
    runs.add_argument("--clip-model", default=None, metavar="DIR", help="a transformers CLIP folder (e.g. "
                      "openai/clip-vit-large-patch14, downloaded beforehand) for the CLIP score and FID")
    runs.add_argument("--reference", default=None, metavar="DIR", help="real images: FID of the run against them")
    runs.add_argument("--inception-weights", default=None, metavar="FILE", help="FID on Inception-v3 features (the "
                      "papers' FID) from this pt_inception-2015-12-05 file; needs torch-fidelity, which needs torchvision")
    runs.add_argument("--by", default=None, metavar="COLUMN", help="CLIP score per value of this column of a .tsv "
                      "run (PartiPrompts: Category or Challenge)")
    runs.add_argument("--compare", nargs=2, default=None, metavar=("RUN_A", "RUN_B"), help="two runs over the same "
                      "prompts and seeds: compare.png (side by side) and compare.md (the differences) in --out")
    runs.add_argument("--out", default=None, metavar="DIR", help="--compare: where to write (default: RUN_B/compare)")
    return p


def cmd_eval(a: argparse.Namespace) -> None:
    if a.compare:
        clip = load_clip(a.clip_model) if a.clip_model else None
        out = a.out or str(Path(a.compare[1]) / "compare")
        print(compare(*a.compare, out, clip))
        return print(Path(out) / "compare.png")
    if a.run is not None:
        return _eval_run(a)
    return _eval_shapes(a)


def _eval_run(a: argparse.Namespace) -> None:
    clip = load_clip(a.clip_model) if a.clip_model else None  # a missing CLIP is refused before generating
    if a.from_file:
        pipe = _model(a)
        steps = int(a.steps.split(",")[0]) if a.steps else None
        given = (("steps", steps), ("guidance", a.guidance), ("sampler", a.sampler))
        settings = {k: v for k, v in given if v is not None}
        rows = [replace(r, settings={**settings, **r.settings})
                for r in read_rows(a.from_file, None, a.filter)]
        run_rows(pipe, rows, a.run, a.seed, a.batch_size)
    print(run_markdown(score_run(a.run, clip, a.reference, a.by, inception=a.inception_weights)))


def _model(a: argparse.Namespace):
    """--model with its --lora files and --embedding files loaded."""
    pipe = load(a.model)
    for path, scale in (lora_arg(text) for text in a.lora):
        pipe.load_lora(path, scale)
    for path in a.embedding:
        pipe.load_embedding(path)
    return pipe


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a shapes model folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=500, help="prompts of the fixed, seeded eval set")
    p.add_argument("--steps", default=None, help="comma-separated step counts (default: the model's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a prompts x steps sample grid PNG here")
    p.add_argument("--clip", default=None, help="a trained tiny-CLIP folder (RUN/clip; default: the built-in one)")
    p.add_argument("--no-clip", action="store_true", help="skip the tiny-CLIP score and Fréchet distance")
    p.add_argument("--why", action="store_true", help="also count why the wrong images are wrong "
                   "(position swap, extra object, binding, ...) per step count")
    p.add_argument("--edits", action="store_true", help="score editing instead: --n recolourings (image to image "
                   "at --strength) and --n object replacements (inpainting); docs/editing.md")
    p.add_argument("--strength", type=float, default=0.6, help="--edits: the recolouring's strength")
    p.add_argument("--no-overlay", action="store_true", help="--edits: inpaint without pasting the original back")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="score the model with this "
                   "LoRA loaded (repeatable)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH", help="score the model with this "
                   "textual-inversion embedding loaded, its word the file's name (repeatable; e.g. the one "
                   "`fewstep train lora --new-token` writes)")
    p.add_argument("--controlnet", default=None, metavar="DIR", help="score a ControlNet for the model instead: "
                   "--n held-out scenes drawn with their control maps, full and colour-only prompts; the base "
                   "model's accuracy without it beside (docs/controlnet.md)")
    p.add_argument("--condition", default="layout", choices=control_study.CONDITIONS,
                   help="--controlnet: the control map it was trained on (default layout)")
    p.add_argument("--control-scale", type=float, default=1.0, help="--controlnet: its controlnet_conditioning_scale")
    p.add_argument("--new-shape", default=None, choices=NEW_SHAPES, help="score prompts with this shape the "
                   "shipped models never saw (a LoRA's concept; docs/lora.md) instead; no tiny-CLIP score")


def why_line(steps: int, prompts: list[str], images) -> str:
    """'4 steps, wrong: 1-object: extra object 5, ...; 2-object: position 38, ...' (most common first)."""
    counts = failures(prompts, list(images))
    parts = [f"{n}-object: " + (", ".join(f"{k} {v}" for k, v in counts[n].most_common() if k != "right") or "none")
             for n in (1, 2) if sum(counts[n].values())]
    return f"{steps} steps, wrong: " + "; ".join(parts)


def _eval_shapes(a: argparse.Namespace) -> None:
    pipe = _model(a)
    if a.edits:
        return _eval_edits(pipe, a)
    if a.controlnet:
        return _eval_controlnet(pipe, a)
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [pipe.defaults.steps]
    if a.new_shape:
        prompts, clip, reference = concept_prompts(a.seed, a.n, a.new_shape), None, None
    else:
        prompts, clip, reference = eval_set(a.seed, a.n, not a.no_clip, a.clip)
    results, columns = [], {}
    for s in steps:
        r, images = evaluate(pipe, prompts, s, a.seed, clip, reference, guidance=a.guidance, sampler=a.sampler)
        results.append(r)
        columns[s] = images
        print(markdown([r], pipe.name).splitlines()[-1], flush=True)
        if a.why:
            print(why_line(s, prompts, images), flush=True)
    print(markdown(results, pipe.name))
    if a.grid:
        path = Path(a.grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(columns, prompts).save(path)
        print(path)


def _eval_edits(pipe, a: argparse.Namespace) -> None:
    steps = int(a.steps) if a.steps else None
    figures, made, painted = edit_study.run(pipe, a.n, a.seed, a.strength, steps, overlay=not a.no_overlay)
    print(edit_study.markdown(figures, f"{pipe.name} ({steps or pipe.defaults.steps} steps)"))
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        edit_study.grid(made, painted).save(a.grid)
        print(a.grid)


CONTROL_SEED = 7_000_000  # held-out scenes: training draws its scenes from 63-bit hashes of (seed, step)


def _eval_controlnet(pipe, a: argparse.Namespace) -> None:
    """The held-out cases without and with the ControlNet, and the base model's accuracy on the eval set
    before loading it and after unloading it (the same: training never touches the base)."""
    steps = int(a.steps) if a.steps else pipe.defaults.steps
    cases, prompts = control_study.held_out(CONTROL_SEED + a.seed, a.n), sample_prompts(a.seed, a.n)
    before, _ = evaluate(pipe, prompts, steps, a.seed)
    plain, plain_images, maps = control_study.run(pipe, cases, a.condition, steps, a.seed, control=False)
    pipe.load_controlnet(a.controlnet)
    steered, images, _ = control_study.run(pipe, cases, a.condition, steps, a.seed, a.control_scale)
    pipe.unload_controlnet()
    after, _ = evaluate(pipe, prompts, steps, a.seed)
    name = Path(a.controlnet).name + ("" if a.control_scale == 1 else f" at {a.control_scale:g}")
    print(control_study.markdown([(f"{pipe.name}, no control", plain), (f"{pipe.name} + {name}", steered)]))
    print()
    print(markdown([before], f"{pipe.name} before loading it"))
    print(markdown([after], f"{pipe.name} after unloading it").splitlines()[-1])
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        control_study.grid(cases, maps, images, plain_images).save(a.grid)
        print(a.grid)
