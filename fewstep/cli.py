"""The `fewstep` command line: `fewstep generate "prompt" [--model PATH] ...`.

User mistakes (`FewstepError`) print one line and exit with status 2; warnings print one line each.
Where images go is checked before any work; they are written atomically (`fewstep.outputs`), so an
interrupted run never leaves a partial file, and carry A1111's "parameters" text.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from .api import load
from .batch.cli import add_prompt_args, batch_size, generate_rows, summary
from .bench.harness import SCHEMES, Options, Settings, parse_cache, run_bench
from .bench.report import table
from .errors import FewstepError
from .inspect.compare import compare, render_compare
from .inspect.controlnet import is_control
from .inspect.controlnet import report as control_report
from .inspect.lora import is_lora
from .inspect.lora import report as lora_report
from .inspect.measure import inspect_model
from .inspect.report import render
from .inspect.svg import write_diagram
from .edits import FILLS, load_image, load_mask
from .outputs import plan, save_image
from .preprocess import PREPROCESSORS, preprocess
from .request import resolve, seeds_for
from .samplers import SAMPLERS
from .schedules import SIGMA_SCHEDULES
from .shapes.caption import parse_prompt
from .shapes.cli import add_dataset_parser, cmd_dataset
from .speed.quantize import quantize
from .loading.lora import lora_arg
from .scoring.cli import add_eval_parser, cmd_eval
from .serve.cli import add_serve_parser, cmd_serve
from .train.cli import add_train_parser, cmd_train


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_prompt_args(p)
    p.add_argument("--model", default=None, help="diffusers folder, .safetensors checkpoint or hub id "
                   "(default: the built-in model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--sampler", default=None, help=", ".join(SAMPLERS) + " (default: the model's; docs/samplers.md)")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigma spacing")
    p.add_argument("--sigma-schedule", choices=SIGMA_SCHEDULES, default=None,
                   help="noise-level spacing in place of the model's (A1111's 'Schedule type')")
    p.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i; -1: a random seed "
                   "(written into each image's parameters)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--batch-size", default=None, help="make --num-images (--from-file: rows of one settings) this "
                   "many at a time (default: all at once; 1 for --from-file); --from-file: auto, the fastest measured")
    p.add_argument("--output", default="outputs", help="an image path (.png, .jpg or .webp: the settings go in "
                   "its PNG text or EXIF, as A1111 writes them), or a folder (default: outputs/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--config", default=None, help="for single-file checkpoints: a diffusers folder with "
                   "the tokenizers and configs to use")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.pt pickle files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _network_args(p.add_argument_group("LoRAs, embeddings, the text encoder (docs/lora.md, docs/prompts.md)"))
    _edit_args(p.add_argument_group("image to image, inpainting, outpainting (docs/editing.md)"))
    _control_args(p.add_argument_group("ControlNet and T2I-Adapter (docs/controlnet.md)"))
    speed = p.add_argument_group("speed options (docs/BENCHMARKS.md)")
    speed.add_argument("--decoder", default=None, help="tiny (TAESD from the hub), a TAESD folder, or full")
    speed.add_argument("--token-downsample", type=int, default=None, metavar="F",
                       help="ToDo: self-attention keys/values from FxF-pooled tokens at the highest resolution")
    _quantize_args(speed)


def _network_args(p) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="a LoRA file (diffusers / "
                   "PEFT or kohya / A1111) at SCALE (default 1); repeat to stack several (docs/lora.md)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH", help="a textual-inversion embedding; "
                   "its file name is its word in the prompt (docs/prompts.md)")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="where <lora:name:scale> in the prompt finds "
                   "name.safetensors")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N", help="leave the text encoder's last N layers "
                   "out (diffusers' clip_skip; A1111's 'Clip skip: 2' is --clip-skip 1)")


def _edit_args(p) -> None:
    p.add_argument("--image", default=None, help="start from this image (image to image; its size by default)")
    p.add_argument("--strength", type=float, default=None, help="how much of the image to re-draw, 0-1 "
                   "(default 0.8; with --mask 1.0)")
    p.add_argument("--mask", default=None, help="inpaint: repaint where this greyscale image is white")
    p.add_argument("--mask-blur", type=int, default=0, metavar="PX", help="blur the mask's edge by PX pixels")
    p.add_argument("--invert-mask", action="store_true", help="repaint where the mask is black instead")
    p.add_argument("--inpaint-only-masked", type=int, nargs="?", const=32, default=None, metavar="PAD",
                   help="work on the masked region only (plus PAD pixels, default 32) at the full size, then paste "
                   "it back")
    p.add_argument("--overlay", action="store_true", help="keep the original's pixels exactly outside the mask")
    p.add_argument("--masked-content", default="original", choices=FILLS, help="what the masked area starts from")
    p.add_argument("--outpaint", default=None, metavar="L,R,T,B", help="grow the canvas by these margins (pixels, "
                   "rounded up to multiples of 8) and paint them")


def _control_args(p) -> None:
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]", help="a ControlNet or "
                   "T2I-Adapter (diffusers folder, original .safetensors file or hub id) at SCALE (default 1); "
                   "repeatable, each with its --control-image in the same order")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE", help="the control image (edges, "
                   "pose, depth ... as the model expects it; resized to the output size)")
    p.add_argument("--control-preprocess", action="append", default=[], choices=PREPROCESSORS, metavar="MODULE",
                   help="make the control image from a photo first: canny (OpenCV), invert, none; once for all "
                   "or once per --control-image")
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where control starts")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where control stops")
    p.add_argument("--guess-mode", action="store_true", help="the control steers the prompt's half only "
                   "(sd-webui-controlnet's 'ControlNet is more important')")


def _controls(a: argparse.Namespace) -> tuple[list, list[float]]:
    """(control images, scales) of --controlnet / --control-image, checked before the model loads."""
    if len(a.control_image) != len(a.controlnet):
        raise FewstepError(f"{len(a.controlnet)} --controlnet and {len(a.control_image)} --control-image: give one "
                           "control image per control model, in the same order")
    modules = a.control_preprocess * len(a.control_image) if len(a.control_preprocess) == 1 else a.control_preprocess
    if modules and len(modules) != len(a.control_image):
        raise FewstepError(f"{len(a.control_preprocess)} --control-preprocess for {len(a.control_image)} "
                           "--control-image: give one for all, or one per image")
    images = [load_image(path) for path in a.control_image]
    images = [preprocess(m, im) for m, im in zip(modules, images)] if modules else images
    return images, [lora_arg(text)[1] for text in a.controlnet]


def _outpaint(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise FewstepError(f"--outpaint {text!r}: give four margins in pixels, LEFT,RIGHT,TOP,BOTTOM (e.g. 64,64,0,0)")
    return tuple(int(p) for p in parts)


def _quantize_args(p) -> None:
    """--quantize and --quantize-parts, for generate and bench (`_parts` reads the latter)."""
    p.add_argument("--quantize", default=None, choices=SCHEMES, help="int8-cpu: oneDNN int8 on x86 CPUs")
    p.add_argument("--quantize-parts", default="unet", metavar="PARTS",
                   help="what --quantize quantizes, comma-separated: unet, text, decoder (default unet)")


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(","))


def cmd_generate(a: argparse.Namespace) -> None:
    if (a.prompt is None) == (a.from_file is None):
        raise FewstepError("give a prompt or --from-file FILE (one of them)")
    if a.from_file is not None:
        if a.controlnet:
            raise FewstepError("--controlnet applies to one prompt; --from-file runs do not take control images yet")
        report = generate_rows(a, _pipeline)
        return say(summary(report, a.output)) if report else None
    if batch_size(a.batch_size) == "auto":
        raise FewstepError("--batch-size auto is for --from-file runs; give a number")
    seeds = seeds_for(a.seed, a.num_images)
    paths = plan(a.output, list(seeds))  # before any work: where the images go, and that they can go there
    outpaint = _outpaint(a.outpaint)
    image = None if a.image is None else load_image(a.image)  # unreadable inputs are refused before loading too
    mask = None if a.mask is None else load_mask(a.mask)
    control_images, control_scales = _controls(a)
    pipe = _pipeline(a)
    request = resolve(pipe.defaults, a.prompt, a.negative_prompt, steps=a.steps, guidance=a.guidance,
                      sampler=a.sampler, karras=a.karras, seed=seeds[0], width=a.width, height=a.height,
                      num_images=a.num_images, batch_size=batch_size(a.batch_size), image=image, mask_image=mask,
                      strength=a.strength, mask_blur=a.mask_blur, invert_mask=a.invert_mask,
                      padding_mask_crop=a.inpaint_only_masked, overlay=a.overlay, masked_content=a.masked_content,
                      outpaint=outpaint, clip_skip=a.clip_skip, sigma_schedule=a.sigma_schedule,
                      control_image=control_images or None, controlnet_conditioning_scale=control_scales or 1.0,
                      control_guidance_start=a.control_start, control_guidance_end=a.control_end,
                      guess_mode=a.guess_mode)
    if pipe.defaults.prompt_grammar == "shapes":
        warn_outside_grammar(a.prompt)
    images = pipe.generate(request, progress=not a.quiet)
    for image, path in zip(images, paths):
        save_image(image, path)
        say(str(path))


def _pipeline(a: argparse.Namespace):
    """The pipeline `fewstep generate`'s options ask for: model, dtype, LoRAs, embeddings, quantization."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    pipe = load(a.model, device=a.device, dtype=dtype, config=a.config, allow_pickle=a.allow_pickle,
                decoder=a.decoder, token_downsample=a.token_downsample)
    for path, scale in (lora_arg(text) for text in a.lora):
        pipe.load_lora(path, scale)
    pipe.lora_dir = a.lora_dir
    for path in a.embedding:
        pipe.load_embedding(path, allow_pickle=a.allow_pickle)
    if a.controlnet:
        pipe.load_controlnet([lora_arg(text)[0] for text in a.controlnet], allow_pickle=a.allow_pickle)
    if a.quantize:
        quantize(pipe, a.quantize, _parts(a.quantize_parts))
    return pipe


def warn_outside_grammar(prompt: str) -> None:
    """The built-in model's prompts follow a small grammar (docs/shapes.md); it draws something for any
    prompt, but say so when a prompt is outside it."""
    try:
        parse_prompt(prompt)
    except FewstepError as e:
        warnings.warn(f"{e} (the built-in model draws something anyway)", stacklevel=2)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a built-in architecture (sd15, sd21-base, sd-turbo, sdxl-base, sdxl-turbo, "
                   "sdxs-512, taesd; no weights needed), a shipped model, a diffusers folder, a .safetensors "
                   "checkpoint, a LoRA file, a ControlNet / T2I-Adapter folder or a hub id (only configs and headers are read)")
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
    if is_lora(Path(a.model)) or is_control(Path(a.model)):
        text = (lora_report if is_lora(Path(a.model)) else control_report)(a.model, a.format)
        return Path(a.output).write_text(text, encoding="utf-8") if a.output else sys.stdout.write(text)
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


def say(text: str, stream=None) -> None:
    """One line to stdout (or `stream`), with any character the terminal cannot take escaped, not raised."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), file=stream, flush=True)


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        say(f"warning: {message}", sys.stderr)
    warnings.showwarning = show


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes as one-line FewstepErrors (its own way prints the usage block and exits)."""

    def error(self, message: str):
        raise FewstepError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="fewstep", description="fast few-step text-to-image diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub.add_parser("generate", help="generate images from a prompt"))
    _inspect_args(sub.add_parser("inspect", help="layers, shapes, parameters and FLOPs of an architecture"))
    add_eval_parser(sub)
    _bench_args(sub.add_parser("bench", help="load, encode, step, decode and end-to-end time, memory; vs diffusers"))
    add_dataset_parser(sub)
    add_train_parser(sub)
    add_serve_parser(sub)
    _one_line_warnings()
    try:
        a = parser.parse_args(argv)
        {"generate": cmd_generate, "inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval,
         "bench": cmd_bench, "dataset": cmd_dataset, "serve": cmd_serve}[a.command](a)
    except FewstepError as e:
        say(f"error: {e}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
