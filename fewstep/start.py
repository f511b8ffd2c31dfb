"""Where sampling starts, and what keeps an inpainting on its source: text-to-image starts from pure
noise; image-to-image and inpainting from the encoded source at the step the strength says, as diffusers'
StableDiffusion(XL)Img2Img / Inpaint pipelines do, with the same random draws in the same order per image:

1. a sample of the source's latent posterior (image-to-image; inpainting with a 4-channel UNet or strength
   below 1), 2. the initial noise, 3. a sample of the masked source's latents (inpainting), 4. (fewstep's
   own, after diffusers' draws) the noise of A1111's "latent noise" masked content.

The schedule keeps its length and the first `steps - int(steps * strength)` steps are skipped; the start
is x0 + sigma * noise (diffusers' `add_noise`), except inpainting at strength 1, which starts from pure
noise. A 9-channel inpainting UNet reads (latents, mask, masked-source latents) stacked; with a 4-channel
UNet the source, noised to the next step's sigma, replaces the unmasked part after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .edits import Edit
from .imaging import autoencoder_input
from .noise import randn


@dataclass
class Start:
    """What `samplers.run` and the model function need to begin: the first step, the clean latents x0
    (None: pure noise), the unit noise, the extra UNet input channels and the per-step blend."""

    step: int
    x0: torch.Tensor | None
    noise: torch.Tensor
    extra: torch.Tensor | None = None  # [n, 5, h, w]: the mask and the masked source's latents (9-channel UNets)
    blend: Callable | None = None
    noisy: torch.Tensor | None = None  # latents an earlier run left, to take up (`samplers.run`)


def first_step(steps: int, strength: float) -> int:
    """diffusers' strength rule: int(steps * strength) steps run, at the end of the schedule."""
    return steps - min(int(steps * strength), steps)


def encode(ae: torch.nn.Module, image: torch.Tensor, generators: list) -> torch.Tensor:
    """[n, C, h, w] latents of one source image [1, 3, H, W]: a posterior sample per generator (a KL VAE;
    TAESD is deterministic and draws nothing)."""
    z = ae.encode(autoencoder_input(ae, image), generators, sample=True).float()
    return z.expand(len(generators), -1, -1, -1)


def start(edit: Edit | None, steps: int, shape: tuple[int, ...], generators: list, ae: torch.nn.Module,
          in_channels: int, device: torch.device) -> Start:
    """The Start of a batch of len(generators) images of latent `shape` [C, h, w] (see the module docstring)."""
    if edit is None:
        return Start(0, None, randn((len(generators), *shape), generators, device=device))
    masked = edit.mask is not None
    full = masked and edit.strength == 1.0  # inpainting from pure noise
    x0 = None if full and in_channels != 4 else encode(ae, edit.image, generators)
    noise = randn((len(generators), *shape), generators, device=device)
    if not masked:
        return Start(first_step(steps, edit.strength), x0, noise)
    mask = F.interpolate(edit.mask, size=shape[1:]).to(device).expand(len(generators), -1, -1, -1)  # [n, 1, h, w]
    source = encode(ae, edit.image * (edit.mask < 0.5), generators)  # drawn for 4-channel UNets too, as diffusers
    x0 = x0 if x0 is None else _fill(x0, mask, edit.fill, generators)
    extra = torch.cat([mask, source], dim=1) if in_channels != 4 else None
    return Start(first_step(steps, edit.strength), None if full else x0, noise, extra,
                 None if in_channels != 4 else keep_source(x0, noise, mask, steps - first_step(steps, edit.strength)))


def _fill(x0: torch.Tensor, mask: torch.Tensor, fill: str, generators: list) -> torch.Tensor:
    """A1111's masked content: the source's latents, fresh noise, or zeros where the mask repaints."""
    if fill == "latent noise":
        return x0 * (1 - mask) + randn(tuple(x0.shape), generators, device=x0.device) * mask
    return x0 * (1 - mask) if fill == "latent nothing" else x0


def keep_source(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, n: int) -> Callable:
    """The 4-channel inpainting blend after step i of n: the source noised to the next sigma outside the
    mask (after the last step: the clean source, in the sampler's VE space)."""
    def blend(i: int, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = float(sigma)
        ref = x0 * (sigma ** 2 + 1) ** 0.5 if i == n - 1 else x0 + noise * sigma
        return (1 - mask) * ref + mask * x
    return blend
