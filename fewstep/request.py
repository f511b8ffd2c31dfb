"""What one call of a Pipeline asks for, resolved once against the model's defaults and checked.

`resolve` turns the caller's arguments (many optional) into a frozen `Request` in which nothing is
left to decide: prompts repeated per image, one seed per image, steps, guidance and sampler filled in
from the checkpoint's `Defaults`, sizes checked. The pipeline then only reads it, batch by batch.
Image-conditioned work, LoRA scales and control images become further fields here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import FewstepError
from .samplers import spec

OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass(frozen=True)
class Defaults:
    """What a checkpoint is meant to be run with when the caller does not say. Loading fills `sampler`
    (from the scheduler class) and `size` (the UNet's training size) where a `fewstep.json` does not."""

    steps: int = 25
    guidance: float = 7.5
    sampler: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Request:
    """One generation, every option decided. Tuples hold one entry per image."""

    prompts: tuple[str, ...]
    negative: tuple[str, ...] | None  # None: no negative prompt (the empty prompt, or zeros for SDXL)
    seeds: tuple[int, ...]  # image i: seed + i
    steps: int
    guidance: float
    sampler: str
    karras: bool | None  # None: as the scheduler config says
    eta: float
    width: int
    height: int
    batch_size: int  # images per model call
    original_size: tuple[int, int]  # SDXL micro-conditioning, (height, width)
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    output_type: str = "pil"
    latents: torch.Tensor | None = field(default=None, compare=False)  # [N, C, h, w] instead of the seeds' noise

    def batches(self) -> list[slice]:
        """The images of each model call, in order."""
        n = len(self.prompts)
        return [slice(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]


def check_size(width, height) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v % 8:
            raise FewstepError(f"{name}={v!r} must be a positive multiple of 8 (e.g. 512)")


def _texts(value, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise FewstepError(f"{what} must be a string or a list of strings")
    return items


def _per_image(prompt, negative_prompt, num_images: int) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """Each prompt (and its negative) repeated num_images times, in order."""
    prompts = [p for p in _texts(prompt, "prompt") for _ in range(num_images)]
    if negative_prompt is None:
        return tuple(prompts), None
    negative = _texts(negative_prompt, "negative_prompt")
    if len(negative) not in (1, len(prompts) // num_images):
        raise FewstepError("negative_prompt must be one string or one per prompt")
    negative = [n for n in negative for _ in range(num_images)] if len(negative) > 1 else negative * len(prompts)
    return tuple(prompts), tuple(negative)


def resolve(defaults: Defaults, prompt, negative_prompt=None, *, steps: int | None = None,
            guidance: float | None = None, sampler: str | None = None, seed: int = 0, width: int | None = None,
            height: int | None = None, num_images: int = 1, batch_size: int | None = None,
            latents: torch.Tensor | None = None, karras: bool | None = None, eta: float = 0.0,
            original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
            target_size: tuple[int, int] | None = None, output_type: str = "pil") -> Request:
    """The Request for these arguments of `Pipeline.__call__` (see there), with `defaults` for what is None."""
    width, height = (defaults.size if width is None else width), (defaults.size if height is None else height)
    check_size(width, height)
    if not isinstance(num_images, int) or num_images < 1:
        raise FewstepError(f"num_images={num_images!r} must be at least 1")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise FewstepError(f"batch_size={batch_size!r} must be at least 1")
    if output_type not in OUTPUT_TYPES:
        raise FewstepError(f"output_type={output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    guidance = defaults.guidance if guidance is None else guidance
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise FewstepError(f"guidance={guidance!r} must be a finite number (<= 1 turns guidance off)")
    sampler = sampler or defaults.sampler
    spec(sampler)
    prompts, negative = _per_image(prompt, negative_prompt, num_images)
    return Request(prompts, negative, tuple(seed + i for i in range(len(prompts))),
                   defaults.steps if steps is None else steps, float(guidance), sampler, karras, eta, width, height,
                   batch_size or len(prompts), tuple(original_size or (height, width)), tuple(crop_top_left),
                   tuple(target_size or (height, width)), output_type, latents)
