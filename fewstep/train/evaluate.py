"""Score a trained model the way the shipped one is judged: generate one image per prompt of the
fixed shapes eval set (`sample_prompts`) and read them back with the shapes evaluator
(`accuracy`: every stated colour, shape, size, position and the background must be right, and
exactly as many objects); also the CLIP score of the tiny CLIP and a contact sheet to look at.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..configs import SchedulerConfig
from ..loading.folders import load_autoencoder, load_text_encoder, load_unet
from ..pipeline import Pipeline
from ..request import Defaults
from ..shapes.caption import sample_prompts
from ..shapes.clip import clip_score, load_clip
from ..shapes.evaluate import accuracy
from ..shapes.metrics import generate
from ..shapes.render import contact_sheet
from ..tokenizer import CLIPTokenizer
from .export import save_unet
from .runs import text_encoder_folder


def run_pipeline(run: Path, unet_folder: Path, scheduler: dict, steps: int, guidance: float,
                 text_folder: Path | None = None) -> Pipeline:
    """An in-memory fp32 pipeline from a run folder's components (before export), with `scheduler`
    (export.TEACHER_SCHEDULER or STUDENT_SCHEDULER); the text encoder from `text_folder`, by default the
    final teacher's."""
    run = Path(run)
    return Pipeline(unet=load_unet(unet_folder), vae=load_autoencoder(run / "vae"),
                    text_encoders=[load_text_encoder(text_folder or text_encoder_folder(run))],
                    tokenizers=[CLIPTokenizer.from_folder(run / "tokenizer")],
                    scheduler=SchedulerConfig.from_diffusers(scheduler),
                    defaults=Defaults(steps=steps, guidance=guidance), name=Path(unet_folder).parent.name)


def evaluate(pipe: Pipeline, n: int = 200, seed: int = 0, clip_folder: Path | None = None,
             sheet: Path | None = None, **kw) -> dict:
    """Accuracy (one / two / all) on the first n eval prompts, seconds per image, mean CLIP score."""
    prompts = sample_prompts(seed, n)
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = generate(pipe, prompts, **kw)
    result = accuracy(prompts, list(images))
    result["seconds_per_image"] = round((time.perf_counter() - t0) / n, 4)
    if clip_folder is not None and Path(clip_folder).is_dir():
        model, tok = load_clip(clip_folder)
        result["clip_score"] = round(float(clip_score(model, tok, images, prompts).mean()), 2)
    if sheet is not None:
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(images[:16], prompts[:16], cols=8, width=160).save(sheet)
    return result


def quick_check(run: Path, unet_folder: Path, scheduler: dict, steps: int, guidance: float, n: int, sheet: Path,
                text_folder: Path | None = None) -> dict:
    """A stage's closing check on n eval prompts (printed, and kept in the recipe's report)."""
    pipe = run_pipeline(run, unet_folder, scheduler, steps, guidance, text_folder)
    result = evaluate(pipe, n, sheet=sheet)
    print(f"{pipe.name}: {steps} steps, guidance {guidance}: accuracy one {result['one']:.3f} two {result['two']:.3f} "
          f"all {result['all']:.3f}; contact sheet {sheet}", flush=True)
    return result


@torch.no_grad()
def preview(unet: torch.nn.Module, data, scheduler: dict, steps: int, guidance: float, path: Path, n: int = 8,
            text: torch.nn.Module | None = None) -> None:
    """A contact sheet of n eval prompts from a UNet in training (with `text`, or else the stage's
    frozen text encoder, and the tokenizer and VAE from `data`, a teacher.LatentData)."""
    unet, text = unet.cpu().eval(), (data.text if text is None else text).cpu().eval()  # copies: the VAE is there
    pipe = Pipeline(unet=unet, vae=data.vae, text_encoders=[text], tokenizers=[data.tokenizer],
                    scheduler=SchedulerConfig.from_diffusers(scheduler),
                    defaults=Defaults(steps=steps, guidance=guidance))
    prompts = sample_prompts(0, n)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(generate(pipe, prompts, batch=n), prompts, cols=n, width=160).save(path)


def finish_unet(run: Path, name: str, unet: torch.nn.Module, sizes, scheduler: dict, steps: int, guidance: float,
                n: int, text_folder: Path | None = None) -> dict:
    """A UNet stage's end: its (EMA) weights to OUT/NAME/unet/ (fp32), then a quick check on n eval
    prompts with `text_folder`'s text encoder (full size only: the evaluator reads 128x128 scenes)."""
    save_unet(Path(run) / name / "unet", unet)
    if sizes.image < 128:
        return {}
    return {"check": quick_check(run, Path(run) / name / "unet", scheduler, steps, guidance, n,
                                 Path(run) / "samples" / f"{name}-stage.png", text_folder)}
