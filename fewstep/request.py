"""What one call of a Pipeline asks for, resolved once against the model's defaults and checked.

`resolve` turns the caller's arguments (many optional) into a frozen `Request` in which nothing is
left to decide: prompts repeated per image, one seed per image, steps, guidance and sampler filled in
from the checkpoint's `Defaults`, sizes checked. The pipeline then only reads it, batch by batch.
Image-conditioned work, the prompts' LoRAs and control images (`control.Control`) are fields here too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from .control import Control, prepare as prepare_control
from .edits import FILLS, Edit, outpaint_canvas, prepare
from .errors import FewstepError
from .prompts import networks
from .samplers import SAMPLERS, spec
from .schedules import SIGMA_SCHEDULES

OUTPUT_TYPES = ("pil", "pt", "latent")
# A1111's "Schedule type" names of the sigma schedules
SCHEDULE_TYPES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                  "ays": "Align Your Steps"}


@dataclass(frozen=True)
class Defaults:
    """What a checkpoint is meant to be run with when the caller does not say. Loading fills `sampler`
    (from the scheduler class) and `size` (the UNet's training size) where a `fewstep.json` does not."""

    steps: int = 25
    guidance: float = 7.5
    sampler: str | None = None
    size: int | None = None
    prompt_grammar: str | None = None  # "shapes": the built-in model's caption grammar (fewstep generate warns outside it)


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
    edit: Edit | None = None  # image-to-image / inpainting: the source, mask and strength
    denoising_end: float | None = None  # stop at this fraction of the schedule (an SDXL base before its refiner)
    denoising_start: float | None = None  # begin there, from `handoff` (the refiner)
    handoff: torch.Tensor | None = field(default=None, compare=False)  # [n, C, h, w] latents a base left
    aesthetic_score: float = 6.0  # SDXL refiner micro-conditioning (diffusers' defaults)
    negative_aesthetic_score: float = 2.5
    loras: tuple[tuple[str, float], ...] = ()  # <lora:name:scale> tags of the prompts, loaded for this call
    clip_skip: int = 0  # text-encoder layers left out of the context (diffusers' meaning)
    sigma_schedule: str | None = None  # schedules.SIGMA_SCHEDULES: replaces the model's spacing (None: karras says)
    control: Control | None = None  # ControlNet / T2I-Adapter inputs: images, scales, guidance windows, guess mode

    def batches(self) -> list[slice]:
        """The images of each model call, in order."""
        n = len(self.prompts)
        return [slice(start, min(start + self.batch_size, n)) for start in range(0, n, self.batch_size)]


MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
MAX_IMAGES = 100_000  # per call: the images are kept until it returns (batch runs over files go further)


def check_size(width, height, suggest: int = 512) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v % 8:
            raise FewstepError(f"{name}={v!r} must be a positive multiple of 8 (e.g. {suggest}, this model's size)")


def _whole(value, name: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FewstepError(f"{name}={value!r} must be a whole number >= {low}")
    return value


def _texts(value, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(p, str) for p in items):
        raise FewstepError(f"{what} must be a string or a non-empty list of strings, not {type(value).__name__}")
    for p in items:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FewstepError(f"{what} holds a character that is not text at position {e.start} (a lone surrogate, "
                               "e.g. from bytes that are not UTF-8): write it as UTF-8 text") from None
    return items


def _per_image(prompt, negative_prompt, num_images: int) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """Each prompt (and its negative) repeated num_images times, in order."""
    texts = _texts(prompt, "prompt")
    if len(texts) * num_images > MAX_IMAGES:
        raise FewstepError(f"{len(texts)} prompt(s) x num_images={num_images} is more than {MAX_IMAGES} images in one "
                           "call: make them in several calls")
    prompts = [p for p in texts for _ in range(num_images)]
    if negative_prompt is None:
        return tuple(prompts), None
    negative = _texts(negative_prompt, "negative_prompt")
    if len(negative) not in (1, len(prompts) // num_images):
        raise FewstepError("negative_prompt must be one string or one per prompt")
    negative = [n for n in negative for _ in range(num_images)] if len(negative) > 1 else negative * len(prompts)
    return tuple(prompts), tuple(negative)


def seeds_for(seed, n: int) -> tuple[int, ...]:
    """Image i's seed: seed + i; seed None or -1 draws one at random (A1111's convention), from [0, 2**32)."""
    if _whole(n, "num_images") > MAX_IMAGES:
        raise FewstepError(f"num_images={n} is more than {MAX_IMAGES} images in one call: make them in several calls")
    if seed is None or seed == -1:
        seed = random.randrange(2**32)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - (n - 1):
        raise FewstepError(f"seed={seed!r} must be a whole number from 0 to 2**64 - {n} (image i uses seed + i), "
                           "or -1 for a random one")
    return tuple(seed + i for i in range(n))


def _pair(value, name: str, default: tuple[int, int]) -> tuple[int, int]:
    value = default if value is None else tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise FewstepError(f"{name}={value!r} must be two whole numbers >= 0, (height, width)")
    return value


def _number(value, name: str, low: float = -math.inf, note: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        bound = f" >= {low:g}" if low > -math.inf else ""
        raise FewstepError(f"{name}={value!r} must be a finite number{bound}{note}")
    return float(value)


def resolve(defaults: Defaults, prompt, negative_prompt=None, *, steps: int | None = None,
            guidance: float | None = None, sampler: str | None = None, seed: int | None = 0,
            width: int | None = None, height: int | None = None, num_images: int = 1, batch_size: int | None = None,
            latents: torch.Tensor | None = None, karras: bool | None = None, eta: float = 0.0,
            original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
            target_size: tuple[int, int] | None = None, output_type: str = "pil", image=None, mask_image=None,
            strength: float | None = None, mask_blur: int = 0, invert_mask: bool = False,
            padding_mask_crop: int | None = None, overlay: bool = False, masked_content: str = "original",
            outpaint: tuple[int, int, int, int] | None = None, denoising_start: float | None = None,
            denoising_end: float | None = None, aesthetic_score: float = 6.0,
            negative_aesthetic_score: float = 2.5, clip_skip: int | None = None, sigma_schedule: str | None = None,
            control_image=None, controlnet_conditioning_scale: float | list = 1.0,
            control_guidance_start: float | list = 0.0, control_guidance_end: float | list = 1.0,
            guess_mode: bool = False) -> Request:
    """The Request for these arguments of `Pipeline.__call__` (see there), with `defaults` for what is None."""
    handoff, image, width, height = _handoff(image, denoising_start, denoising_end, width, height)
    image, mask_image, overlay = _outpaint(image, mask_image, outpaint, overlay)
    edit, width, height = _edit(image, mask_image, strength, width, height, mask_blur, invert_mask,
                                padding_mask_crop, overlay, masked_content)
    if control_image is not None and padding_mask_crop is not None:
        raise FewstepError("padding_mask_crop does not combine with control_image: inpaint the whole image")
    control, width, height = prepare_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                             control_guidance_end, guess_mode, width, height)
    width, height = (defaults.size if width is None else width), (defaults.size if height is None else height)
    check_size(width, height, defaults.size)
    _check_kinds(num_images, batch_size, output_type, karras, latents)
    guidance = _number(defaults.guidance if guidance is None else guidance, "guidance", note=" (<= 1: no guidance)")
    loras = _prompt_loras(prompt)
    sampler = sampler or defaults.sampler
    spec(sampler)
    prompts, negative = _per_image(prompt, negative_prompt, num_images)
    return Request(prompts, negative, seeds_for(seed, len(prompts)),
                   _whole(defaults.steps if steps is None else steps, "steps"), guidance, sampler, karras,
                   _number(eta, "eta", 0.0), width, height, batch_size or len(prompts),
                   _pair(original_size, "original_size", (height, width)), _pair(crop_top_left, "crop_top_left", (0, 0)),
                   _pair(target_size, "target_size", (height, width)), output_type, latents, edit,
                   _fraction(denoising_end, "denoising_end"), denoising_start, handoff,
                   _number(aesthetic_score, "aesthetic_score"), _number(negative_aesthetic_score, "negative_aesthetic_score"),
                   loras, _whole(clip_skip or 0, "clip_skip", 0), _sigma_schedule(sigma_schedule, karras, sampler),
                   control)


def _outpaint(image, mask_image, outpaint, overlay: bool) -> tuple:
    """(image, mask, overlay) of an outpainting: the grown canvas and the mask of its margins (`edits`)."""
    if outpaint is None:
        return image, mask_image, overlay
    if image is None or mask_image is not None:
        raise FewstepError("outpaint needs an image (image=...) and makes its own mask (no mask_image)")
    # the original's pixels are kept exactly (overlay); only the margins (and the seam) are new
    return *outpaint_canvas(image, *outpaint), True


def _sigma_schedule(value, karras: bool | None, sampler: str) -> str | None:
    """A known sigma schedule, for a sampler that walks free sigmas, agreeing with `karras`."""
    if value is None:
        return None
    if value not in SIGMA_SCHEDULES:
        raise FewstepError(f"unknown sigma_schedule {value!r}; choose one of: {', '.join(SIGMA_SCHEDULES)}")
    if karras is not None and karras != (value == "karras"):
        raise FewstepError(f"karras={karras} and sigma_schedule={value!r} contradict each other; give one")
    if not spec(sampler).karras:
        free = ", ".join(n for n, s in SAMPLERS.items() if s.karras)
        raise FewstepError(f"sigma_schedule={value!r} applies to {free}, not {sampler}")
    return value


def _prompt_loras(prompt) -> tuple[tuple[str, float], ...]:
    """The <lora:name:scale> tags of a call's prompts: the same in every prompt (LoRAs apply to the call)."""
    tags = {networks(p) for p in _texts(prompt, "prompt")}
    if len(tags) > 1:
        raise FewstepError("the prompts of one call ask for different LoRAs (<lora:...> tags): make separate calls")
    found = next(iter(tags))
    other = [f"<{k}:{n}>" for k, n, _ in found if k != "lora"]
    if other:
        raise FewstepError(f"{', '.join(other)}: fewstep loads LoRAs (<lora:name:scale>), not this kind of network")
    return tuple((n, s) for _, n, s in found)


def _fraction(value, name: str) -> float | None:
    if value is not None and not 0 < _number(value, name) < 1:
        raise FewstepError(f"{name}={value!r} must be between 0 and 1 (a fraction of the schedule)")
    return value


def _handoff(latents, denoising_start, denoising_end, width, height) -> tuple:
    """(handoff, image, width, height): the latents a base left (`output_type="latent"` with `denoising_end`),
    taken up at `denoising_start` instead of an image; without denoising_start, the image as it is."""
    if denoising_start is None:
        return None, latents, width, height
    _fraction(denoising_start, "denoising_start")
    if denoising_end is not None and denoising_end <= denoising_start:
        raise FewstepError(f"denoising_end={denoising_end} must come after denoising_start={denoising_start}")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] == 3:
        raise FewstepError("denoising_start continues from latents: pass a base's output_type='latent' result "
                           "(a [N, C, h, w] tensor) as image=")
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    return latents.float(), None, width or w, height or h


def _check_kinds(num_images, batch_size, output_type, karras, latents) -> None:
    _whole(num_images, "num_images")
    if batch_size is not None:
        _whole(batch_size, "batch_size")
    if output_type not in OUTPUT_TYPES:
        raise FewstepError(f"output_type={output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    if karras not in (None, True, False) or latents is not None and not isinstance(latents, torch.Tensor):
        raise FewstepError("karras must be True, False or None, and latents a tensor or None")


def _edit(image, mask_image, strength, width, height, mask_blur, invert_mask, padding_mask_crop, overlay,
          masked_content) -> tuple[Edit | None, int | None, int | None]:
    """The image-conditioned part of a request (None without an image): strength by default diffusers'
    (0.8 image-to-image, 1.0 inpainting), the options checked, the inputs prepared (`edits.prepare`)."""
    if image is None:
        if mask_image is not None or strength is not None:
            raise FewstepError("mask_image and strength need an image to start from (image=...)")
        return None, width, height
    strength = _number((0.8 if mask_image is None else 1.0) if strength is None else strength, "strength", 0.0)
    if strength > 1:
        raise FewstepError(f"strength={strength!r} must be between 0 and 1 (1: repaint from pure noise)")
    if masked_content not in FILLS:
        raise FewstepError(f"masked_content={masked_content!r}: choose one of {', '.join(FILLS)}")
    if padding_mask_crop is not None:
        _whole(padding_mask_crop, "padding_mask_crop", 0)
    check_size(8 if width is None else width, 8 if height is None else height)
    return prepare(image, mask_image, strength, width, height, mask_blur=_whole(mask_blur, "mask_blur", 0),
                   invert_mask=bool(invert_mask), padding_mask_crop=padding_mask_crop, overlay=bool(overlay),
                   fill=masked_content)


def infotext(request: Request, i: int, model: str, sampler_name: str, loras: dict[str, str] | None = None,
             controls: tuple[str, ...] = ()) -> str:
    """A1111's "parameters" text of image i: the prompt, the negative prompt when there is one, then the
    settings (`Steps: 4, Sampler: LCM, CFG scale: 0, Seed: 7, Size: 128x128, Model: shapes-turbo`); with
    control models (named `controls`), sd-webui-controlnet's "ControlNet N" fields."""
    lines = [request.prompts[i]]
    if request.negative is not None and request.negative[i]:
        lines.append(f"Negative prompt: {request.negative[i]}")
    settings = [f"Steps: {request.steps}", f"Sampler: {sampler_name}"]
    schedule = request.sigma_schedule or ("karras" if request.karras else None)
    settings += [f"Schedule type: {SCHEDULE_TYPES[schedule]}"] if schedule else []
    settings += [f"CFG scale: {request.guidance:g}", f"Seed: {request.seeds[i]}",
                 f"Size: {request.width}x{request.height}", f"Model: {model}"]
    settings += [f"Clip skip: {request.clip_skip + 1}"] if request.clip_skip else []
    if loras:  # A1111's field: "name: short hash" for each LoRA, quoted
        settings.append('Lora hashes: "' + ", ".join(f"{n}: {h}" for n, h in loras.items()) + '"')
    settings += _edit_settings(request.edit) + _control_settings(request, controls)
    return "\n".join(lines + [", ".join(settings)])


def _control_settings(request: Request, names: tuple[str, ...]) -> list[str]:
    """sd-webui-controlnet's field per unit (the preprocessor that made the image, "none" when given as is;
    diffusers resizes it to the generation size, the extension's "Just Resize"; guess mode is its
    "ControlNet is more important")."""
    c = request.control
    if c is None:
        return []
    mode = "ControlNet is more important" if c.guess_mode else "Balanced"
    modules = [im.info.get("control_module", "none") for im in c.images]  # set by fewstep.preprocess
    return [f'ControlNet {k}: "Module: {module}, Model: {name}, Weight: {w:g}, Resize Mode: Just Resize, Guidance '
            f'Start: {a:g}, Guidance End: {b:g}, Control Mode: {mode}"' for k, (module, name, w, a, b) in
            enumerate(zip(modules, names, c.scales, c.starts, c.ends))]


def _edit_settings(edit: Edit | None) -> list[str]:
    """A1111's infotext fields of an image-conditioned generation."""
    if edit is None:
        return []
    out = [f"Denoising strength: {edit.strength:g}"]
    if edit.mask is not None:
        out += [f"Mask blur: {edit.mask_blur}"] if edit.mask_blur else []
        out += ["Mask mode: Inpaint not masked"] if edit.inverted else []
        out += [f"Masked content: {edit.fill}"] if edit.fill != "original" else []
        out += ["Inpaint area: Only masked", f"Masked area padding: {edit.padding}"] if edit.crop else []
    return out
