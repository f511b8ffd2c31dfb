"""A1111's API vocabulary: the txt2img / img2img request bodies with its field names, its sampler and
"Schedule type" names, base64 images, and the fields fewstep accepts but does not act on.

Follows AUTOMATIC1111's `modules/api/models.py` (StableDiffusionTxt2ImgProcessingAPI and the img2img one):
every field it defines is accepted, unknown ones too (extensions add their own), so a client written for
A1111 never gets a validation error for a field; what fewstep ignores is listed in the response's `info`.
Fields left out take the model's defaults (steps, CFG scale, size), not A1111's (50 steps, 512x512).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ..edits import FILLS, MAX_PIXELS
from ..errors import FewstepError
from ..request import SCHEDULE_TYPES
from ..samplers import SAMPLERS

MAX_PROMPT = 20_000  # characters: far beyond what CLIP reads (75 tokens per chunk), short of a denial of service
# A1111's "Schedule type" names (its /schedulers `name` and `label`) -> fewstep's sigma_schedule (None: the model's)
SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential", "sgm_uniform": "sgm_uniform",
              "align_your_steps": "ays"}
SCHEDULER_LABELS = {"automatic": "Automatic", **{k: SCHEDULE_TYPES[v] for k, v in SCHEDULERS.items() if v}}
# A1111's inpainting_fill index -> fewstep's masked content; 0 ("fill": blurred colours) has no equivalent
INPAINTING_FILL = {0: "original", 1: FILLS[0], 2: FILLS[1], 3: FILLS[2]}
# Fields read here; any other field of a body is reported as ignored when it holds more than its default
USED = {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name", "sampler_index",
        "scheduler", "batch_size", "n_iter", "denoising_strength", "init_images", "mask", "mask_blur",
        "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
        "override_settings", "override_settings_restore_afterwards", "send_images", "save_images", "eta",
        "include_init_images"}
# A1111 defaults that are not "empty" (None, False, 0, -1, "", [], {}), which clients such as webuiapi send
DEFAULTS = {"hr_scale": 2.0, "s_noise": 1.0, "resize_mode": 0, "hr_upscaler": "Latent", "initial_noise_multiplier": 1.0,
            "image_cfg_scale": 1.5, "s_min_uncond": 0.0, "mask_round": True}


class Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img. None: the model's default (or A1111's, where the model has none)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, allow_inf_nan=False)
    width: int | None = Field(None, ge=8, multiple_of=8)
    height: int | None = Field(None, ge=8, multiple_of=8)
    seed: int = Field(-1, ge=-1)
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older field, read where sampler_name is not given
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    eta: float | None = Field(None, allow_inf_nan=False)  # DDIM's eta (other samplers: ignored)
    override_settings: dict | None = None
    send_images: bool = True
    save_images: bool = False


class Img2Img(Txt2Img):
    """POST /sdapi/v1/img2img: Txt2Img's fields and the source image, mask and strength."""

    init_images: list[str] = Field(min_length=1)
    denoising_strength: float | None = Field(None, ge=0, le=1)
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=256)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


def sampler_of(req: Txt2Img) -> tuple[str | None, str | None]:
    """(fewstep sampler, sigma schedule) of the request's sampler and scheduler names: A1111's ("Euler a",
    "DPM++ 2M"; the older "DPM++ 2M Karras" too) or fewstep's ("euler_a"); None: the model's."""
    name, schedule = req.sampler_name or req.sampler_index, schedule_of(req.scheduler)
    if not name:
        return None, schedule
    by_a1111 = {s.a1111.lower(): n for n, s in SAMPLERS.items() if s.a1111}
    key = name.strip().lower()
    if key.endswith(" karras") and key[:-7] in by_a1111 and schedule is None:
        return by_a1111[key[:-7]], "karras"
    found = key if key in SAMPLERS else by_a1111.get(key)
    if found is None:
        known = ", ".join(s.a1111 for s in SAMPLERS.values() if s.a1111)
        raise FewstepError(f"unknown sampler_name {name!r}; choose one of: {known}")
    return found, schedule


def schedule_of(name: str | None) -> str | None:
    """fewstep's sigma_schedule for an A1111 scheduler name or label ("Karras", "sgm_uniform"), any case."""
    if not name:
        return None
    key = name.strip().lower().replace(" ", "_")
    names = {**{s: s for s in SCHEDULE_TYPES}, **SCHEDULERS,
             **{SCHEDULER_LABELS[k].lower().replace(" ", "_"): v for k, v in SCHEDULERS.items()}}
    if key not in names:
        raise FewstepError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_LABELS.values())}")
    return names[key]


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (raw, or a `data:image/...;base64,` URL as webuiapi sends), checked before decoding."""
    if not isinstance(data, str):
        raise FewstepError(f"{what} must be a base64 string")
    raw = re.sub(r"^data:[\w/+.-]*;base64,", "", data.strip())
    try:
        image = Image.open(io.BytesIO(base64.b64decode(raw, validate=True)))
        if image.width * image.height > MAX_PIXELS:
            raise FewstepError(f"{what} is {image.width}x{image.height}: more than {MAX_PIXELS} pixels")
        image.load()
    except Image.DecompressionBombError:
        raise FewstepError(f"{what} has more than {MAX_PIXELS} pixels") from None
    except (binascii.Error, ValueError) as e:
        raise FewstepError(f"{what} is not valid base64 ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise FewstepError(f"{what} is not an image fewstep can read ({type(e).__name__})") from None
    return image


def ignored(body: dict, req: Txt2Img) -> list[str]:
    """The fields given with more than their default that fewstep does not act on (A1111 would)."""
    out = [k for k, v in body.items() if k not in USED and not _empty(v) and DEFAULTS.get(k) != v
           and not (k.startswith("hr_") and not body.get("enable_hr"))]
    if req.eta not in (None, 0, 1) and sampler_of(req)[0] != "ddim":
        out.append("eta")
    if isinstance(req, Img2Img):
        out += ["init_images[1:]"] if len(req.init_images) > 1 else []
        out += ["inpainting_fill"] if req.mask and req.inpainting_fill == 0 else []
    out += [f"override_settings.{k}" for k in (req.override_settings or {}) if k != "CLIP_stop_at_last_layers"]
    return sorted(out)


def _empty(value) -> bool:
    return value is None or value is False or (value is not True and value in (0, -1, "", [], {}))


def parse_infotext(text: str) -> dict:
    """A1111's `parse_generation_parameters`, reduced: the prompt, the negative prompt and the settings line
    (`Steps: 4, Sampler: LCM, Size: 128x128`, quoted values kept whole) as a dict; sizes split in two."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and re.search(r"(^|, )Steps: ", lines[-1]) else ""
    negative = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    out = {"Prompt": "\n".join(lines[:negative]),
           "Negative prompt": "\n".join(lines[negative:]).removeprefix("Negative prompt:").strip()}
    for key, value in re.findall(r'\s*([\w ./-]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        out[key.strip()] = value.strip()
    if re.fullmatch(r"\d+x\d+", out.get("Size", "")):
        out["Size-1"], out["Size-2"] = map(int, out["Size"].split("x"))
    return out
