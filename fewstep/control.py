"""Control models in a generation: ControlNets and T2I-Adapters steering the UNet from control images.

Follows diffusers' StableDiffusion(XL)ControlNet(Img2Img / Inpaint)Pipeline and StableDiffusion(XL)Adapter-
Pipeline: the control image is resized (Lanczos) to the generation size and read as [0, 1] values; each
ControlNet runs on the UNet's own scaled input and timestep at every step inside its guidance window
(`control_guidance_start` / `_end`, fractions of the steps that run) and its residuals, times its scale,
are summed over the ControlNets; in guess mode under classifier-free guidance a ControlNet sees only the
prompt's half and the unconditional half gets zeros. A T2I-Adapter's features are computed once per batch,
times its scale, and added inside the UNet's down path at the steps of its window (diffusers'
`adapter_conditioning_factor` f is the window [0, f]).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .edits import generation_size, load_image
from .errors import FewstepError
from .models.controlnet import ControlNet
from .models.t2i_adapter import T2IAdapter


@dataclass(frozen=True)
class Control:
    """A request's control inputs, one entry per control model of the pipeline, in order."""

    images: tuple[Image.Image, ...] = field(compare=False)  # RGB, at the generation size
    scales: tuple[float, ...] = ()
    starts: tuple[float, ...] = ()  # the fraction of the steps at which each model starts steering
    ends: tuple[float, ...] = ()  # ... and stops
    guess_mode: bool = False


def _per_model(value, n: int, name: str) -> tuple[float, ...]:
    """One finite number per control image: a number for all, or a list of n."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise FewstepError(f"{name} has {len(values)} entries for {n} control image(s): give one number, or one "
                           "per control image")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FewstepError(f"{name}={value!r} must be a finite number or a list of them")
    return tuple(float(v) for v in values)


def prepare(control_image, scale, start, end, guess_mode: bool, width: int | None, height: int | None
            ) -> tuple[Control | None, int | None, int | None]:
    """The Control of these arguments of `Pipeline.__call__` and the generation size (when not given: the
    first control image's, rounded down to a multiple of 8, as diffusers takes it)."""
    if control_image is None:
        if guess_mode:
            raise FewstepError("guess_mode needs a control image (control_image=...)")
        return None, width, height
    if isinstance(control_image, (list, tuple)) and not control_image:
        raise FewstepError("control_image is an empty list: give one image per ControlNet / T2I-Adapter")
    sources = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    images = [load_image(s, "control_image") for s in sources]
    width, height = generation_size(images[0], width, height)
    n = len(images)
    starts, ends = _per_model(start, n, "control_guidance_start"), _per_model(end, n, "control_guidance_end")
    for s, e in zip(starts, ends):
        if not 0 <= s < e <= 1:
            raise FewstepError(f"control_guidance_start={s:g} and control_guidance_end={e:g} must satisfy "
                               "0 <= start < end <= 1")
    if not isinstance(guess_mode, bool):
        raise FewstepError(f"guess_mode={guess_mode!r} must be True or False")
    return Control(tuple(_sized(im, width, height, i) for i, im in enumerate(images)),
                   _per_model(scale, n, "controlnet_conditioning_scale"), starts, ends, guess_mode), width, height


def _sized(image: Image.Image, width: int, height: int, i: int) -> Image.Image:
    if image.size == (width, height):
        return image
    warnings.warn(f"control image {i} is {image.width}x{image.height}: resized to {width}x{height}, the generation "
                  "size (as diffusers does)", stacklevel=5)
    return image.resize((width, height), Image.LANCZOS)


def check(models: list, control: Control | None) -> None:
    """One line when the request's control images do not match the pipeline's control models."""
    if control is None:
        if models:
            raise FewstepError(f"this pipeline has {len(models)} ControlNet / T2I-Adapter model(s) loaded: give "
                               "control_image=... (one per model), or unload them (pipe.unload_controlnet())")
        return
    if not models:
        raise FewstepError("control_image needs a ControlNet or T2I-Adapter: load one with fewstep.load(..., "
                           "controlnet=path) or pipe.load_controlnet(path)")
    if len(control.images) != len(models):
        raise FewstepError(f"{len(control.images)} control image(s) for {len(models)} ControlNet / T2I-Adapter "
                           "model(s): give one control image per model, in the order they were loaded")


def hint(image: Image.Image, channels: int) -> torch.Tensor:
    """[1, channels, H, W] in [0, 1]: RGB, or greyscale for a one-channel model (diffusers' adapter reads an
    "L" image so)."""
    a = np.asarray(image.convert("L") if channels == 1 else image, dtype=np.float32) / 255
    return torch.from_numpy(a.reshape(*a.shape[:2], -1)).permute(2, 0, 1)[None]


class Steering:
    """One batch's control: each model's input (a ControlNet's hint, an adapter's scaled features) made
    once, and the UNet's residual arguments at each model call (`__call__`). `timesteps`: those of the
    steps that run, which place a call in the guidance windows."""

    def __init__(self, models: list, control: Control, timesteps: list[float], n: int, cfg: bool,
                 device: torch.device, dtype: torch.dtype):
        self.models, self.control, self.timesteps, self.cfg = models, control, timesteps, cfg
        first = next((m for m in models if isinstance(m, ControlNet)), None)
        self.guess = control.guess_mode or (first is not None and first.cfg.global_pool_conditions)
        self.inputs = []
        for model, image, scale in zip(models, control.images, control.scales):
            if isinstance(model, T2IAdapter):
                x = hint(image, model.cfg.in_channels).to(device, dtype).expand(n, -1, -1, -1)
                feats = [f * scale for f in model(x)]
                self.inputs.append([torch.cat([f, f]) for f in feats] if cfg else feats)
            else:
                x = hint(image, model.cfg.conditioning_channels).to(device, dtype).expand(n, -1, -1, -1)
                self.inputs.append(torch.cat([x, x]) if cfg and not self.guess else x)

    def active(self, t: torch.Tensor, start: float, end: float) -> bool:
        """diffusers' `controlnet_keep`: step i of N steers unless i / N < start or (i + 1) / N > end. A call
        between two steps' timesteps (a two-call sampler's second) belongs to the earlier step."""
        n = len(self.timesteps)
        i = min(max(sum(ts >= float(t) - 1e-3 for ts in self.timesteps) - 1, 0), n - 1)
        return not (i / n < start or (i + 1) / n > end)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """The UNet's residual arguments for input x (doubled under guidance) at timestep t."""
        downs, mid, intrablock = None, None, None
        c = self.control
        for model, given, scale, start, end in zip(self.models, self.inputs, c.scales, c.starts, c.ends):
            if not self.active(t, start, end):
                continue
            if isinstance(model, T2IAdapter):
                intrablock = given if intrablock is None else [a + b for a, b in zip(intrablock, given)]
                continue
            d, m = self._controlnet(model, given, scale, x, t, cond)
            downs, mid = (d, m) if downs is None else ([a + b for a, b in zip(downs, d)], mid + m)
        out = {} if downs is None else {"down_block_additional_residuals": downs, "mid_block_additional_residual": mid}
        return out if intrablock is None else {**out, "down_intrablock_additional_residuals": list(intrablock)}

    def _controlnet(self, net: ControlNet, image: torch.Tensor, scale: float, x: torch.Tensor, t: torch.Tensor,
                    cond: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        half = self.guess and self.cfg  # guess mode: the prompt's half only, zeros for the unconditional half
        pick = (lambda v: None if v is None else v.chunk(2)[1]) if half else (lambda v: v)
        downs, mid = net(pick(x), t, pick(cond["context"]), image, scale, self.guess, pick(cond.get("text_embeds")),
                         pick(cond.get("time_ids")))
        if half:
            downs, mid = [torch.cat([torch.zeros_like(d), d]) for d in downs], torch.cat([torch.zeros_like(mid), mid])
        return downs, mid
