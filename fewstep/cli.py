"""The `fewstep` command line: `fewstep generate "prompt" [--model PATH] ...`.

User mistakes (`FewstepError`) print one line and exit with status 2; warnings print one line each.
Images are written atomically (a temporary file renamed into place), so an interrupted run never
leaves a partial PNG, and carry A1111-style "parameters" text so other tools can read the settings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from .api import load
from .bench.harness import SCHEMES, Options, Settings, parse_cache, run_bench
from .bench.report import table
from .errors import FewstepError
from .inspect.compare import compare, render_compare
from .inspect.measure import inspect_model
from .inspect.report import render
from .inspect.svg import write_diagram
from .shapes.evaluate import failures
from .shapes.metrics import eval_set, evaluate, markdown, sample_grid
from .speed.quantize import quantize
from .train.cli import add_train_parser, cmd_train


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=None, help="diffusers folder, .safetensors checkpoint or hub id "
                   "(default: the built-in model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--sampler", default=None, help="euler, euler_a, heun, dpmpp_2m, ddim, ddpm, lcm")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigma spacing")
    p.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="throughput mode: make --num-images this many "
                   "at a time (default: all at once)")
    p.add_argument("--output", default="outputs", help="a .png path, or a folder (default: outputs/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--config", default=None, help="for single-file checkpoints: a diffusers folder with "
                   "the tokenizers and configs to use")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.pt pickle files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    speed = p.add_argument_group("speed options (docs/BENCHMARKS.md)")
    speed.add_argument("--decoder", default=None, help="tiny (TAESD from the hub), a TAESD folder, or full")
    speed.add_argument("--token-downsample", type=int, default=None, metavar="F",
                       help="ToDo: self-attention keys/values from FxF-pooled tokens at the highest resolution")
    _quantize_args(speed)


def _quantize_args(p) -> None:
    """--quantize and --quantize-parts, for generate and bench (`_parts` reads the latter)."""
    p.add_argument("--quantize", default=None, choices=SCHEMES, help="int8-cpu: oneDNN int8 on x86 CPUs")
    p.add_argument("--quantize-parts", default="unet", metavar="PARTS",
                   help="what --quantize quantizes, comma-separated: unet, text, decoder (default unet)")


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(","))


def _output_paths(output: str, n: int, seed: int) -> list[Path]:
    out = Path(output)
    if out.suffix.lower() == ".png":
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for f in out.iterdir() if (m := re.match(r"(\d{5})-", f.name))]
    start = max(taken, default=-1) + 1
    return [out / f"{start + i:05d}-{seed + i}.png" for i in range(n)]


def save_png(image, path: Path, parameters: str) -> None:
    """Write a PNG atomically, with the generation settings in its "parameters" text chunk."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); a saved image is not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_generate(a: argparse.Namespace) -> None:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    pipe = load(a.model, device=a.device, dtype=dtype, config=a.config, allow_pickle=a.allow_pickle,
                        decoder=a.decoder, token_downsample=a.token_downsample)
    if a.quantize:
        quantize(pipe, a.quantize, _parts(a.quantize_parts))
    paths = _output_paths(a.output, a.num_images, a.seed)
    images = pipe(a.prompt, a.negative_prompt, steps=a.steps, guidance=a.guidance, sampler=a.sampler,
                  karras=a.karras, seed=a.seed, width=a.width, height=a.height, num_images=a.num_images,
                  progress=not a.quiet, batch_size=a.batch_size)
    d = pipe.defaults
    for i, (image, path) in enumerate(zip(images, paths)):
        params = (f"{a.prompt}\nNegative prompt: {a.negative_prompt or ''}\n"
                  f"Steps: {a.steps or d.steps}, Sampler: {a.sampler or d.sampler}, "
                  f"CFG scale: {d.guidance if a.guidance is None else a.guidance}, Seed: {a.seed + i}, "
                  f"Size: {image.width}x{image.height}, Model: {pipe.name}")
        save_png(image, path, params)
        print(path)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a built-in architecture (sd15, sd21-base, sd-turbo, sdxl-base, sdxl-turbo, "
                   "sdxs-512, taesd; no weights needed), a shipped model, a diffusers folder, a .safetensors "
                   "checkpoint or a hub id (only configs and headers are read)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"], help="for activation sizes")
    p.add_argument("--steps", type=int, default=1, help="denoising steps in the per-image totals")
    p.add_argument("--depth", type=int, default=None, help="collapse layers to N levels of the name hierarchy")
    p.add_argument("--format", default="table", choices=["table", "md", "json", "csv"])
    p.add_argument("--diagram", default=None, metavar="FILE", help="also draw the UNet to FILE.svg or FILE.html")
    p.add_argument("--compare", default=None, metavar="B", help="show what differs from architecture B instead")
    p.add_argument("--output", default=None, help="write the report to this file instead of stdout")


def cmd_inspect(a: argparse.Namespace) -> None:
    if a.depth is not None and a.depth < 1:
        raise FewstepError(f"--depth must be at least 1, got {a.depth}")
    report = inspect_model(a.model, a.resolution, a.batch, a.dtype, a.steps)
    if a.compare:
        other = inspect_model(a.compare, report.resolution, a.batch, a.dtype, a.steps)
        text = render_compare(compare(report, other), a.format)
    else:
        text = render(report, a.format, a.depth)
    if a.diagram:
        write_diagram(report, a.diagram)
        print(f"wrote {a.diagram}", file=sys.stderr)
    if a.output:
        Path(a.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


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


def why_line(steps: int, prompts: list[str], images) -> str:
    """'4 steps, wrong: 1-object: extra object 5, ...; 2-object: position 38, ...' (most common first)."""
    counts = failures(prompts, list(images))
    parts = [f"{n}-object: " + (", ".join(f"{k} {v}" for k, v in counts[n].most_common() if k != "right") or "none")
             for n in (1, 2) if sum(counts[n].values())]
    return f"{steps} steps, wrong: " + "; ".join(parts)


def cmd_eval(a: argparse.Namespace) -> None:
    pipe = load(a.model)
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [pipe.defaults.steps]
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


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="a diffusers folder or hub id "
                   "(default: the built-in model; or use --random-weights)")
    p.add_argument("--random-weights", default=None, metavar="ARCH", help="a real architecture with random "
                   "weights, from ../shared/data/configs/ARCH (sd-turbo, sd15, sd21-base, sdxl-base, sdxl-turbo)")
    p.add_argument("--work-dir", default=None, help="where random-weight folders are kept "
                   "(default: ~/.cache/fewstep/random)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fuse-qkv", action="store_true")
    p.add_argument("--decoder", default="full", help="full, tiny (TAESD from the hub) or a TAESD folder")
    p.add_argument("--compile", action="store_true", help="also reports cold and warm compile time")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--cache", default=None, metavar="INTERVAL[,BRANCH]", help="DeepCache")
    p.add_argument("--token-downsample", type=int, default=1, metavar="F", help="ToDo: self-attention keys and "
                   "values from FxF-pooled tokens at the highest resolution (2 in its paper; default 1: off)")
    p.add_argument("--keep-memory", action="store_true", help="glibc malloc keeps freed memory for the next "
                   "tensors (fewstep.speed.accel.keep_memory; fewstep's process only)")
    _quantize_args(p)
    p.add_argument("--runs", type=int, default=3, help="timed images per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed images first, per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per library, alternating with diffusers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents")
    p.add_argument("--compare", default=None, choices=["diffusers", "diffusers-default"],
                   help="diffusers with the same settings, or with its defaults (fp32, full VAE)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")


def cmd_bench(a: argparse.Namespace) -> None:
    options = Options(a.model, a.random_weights, a.work_dir, a.compare, a.runs, a.warmup, a.rounds, a.threads, a.seed)
    settings = Settings(a.resolution, a.steps, a.batch, a.guidance, a.device, a.dtype, a.channels_last, a.fuse_qkv,
                        a.decoder, a.compile, a.compile_mode, parse_cache(a.cache), a.quantize,
                        _parts(a.quantize_parts), a.token_downsample,
                        a.keep_memory)
    report = run_bench(settings, options, log=lambda m: print(m, file=sys.stderr, flush=True))
    sys.stdout.write(table(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(report.to_json(), encoding="utf-8")


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep", description="fast few-step text-to-image diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub.add_parser("generate", help="generate images from a prompt"))
    _inspect_args(sub.add_parser("inspect", help="layers, shapes, parameters and FLOPs of an architecture"))
    _eval_args(sub.add_parser("eval", help="accuracy, tiny-CLIP score, Fréchet distance and speed of a shapes model"))
    _bench_args(sub.add_parser("bench", help="load, encode, step, decode and end-to-end time, memory; vs diffusers"))
    add_train_parser(sub)
    a = parser.parse_args(argv)
    _one_line_warnings()
    try:
        {"generate": cmd_generate, "inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval,
         "bench": cmd_bench}[a.command](a)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
