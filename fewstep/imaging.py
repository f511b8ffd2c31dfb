"""Images in and out of the latent space: decoding with a safety net for half precision, tensors to PIL
images, and the memory layout an autoencoder wants its input in.

Rounding follows diffusers' VaeImageProcessor (x / 2 + 0.5, clamp, x 255, round), so the same latents
give the same 8-bit pixels in both stacks.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from .errors import FewstepError


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], rounded as diffusers' image processor does."""
    x = ((images.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def memory_format(m: torch.nn.Module) -> torch.memory_format:
    """The layout `m`'s convolutions hold their weights in (see `speed.accel.optimize`): inputs are
    handed over in it, so the first conv does not convert."""
    w = next((c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def autoencoder_input(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents on `ae`'s device, in its dtype and its convolutions' memory layout."""
    p = next(ae.parameters())
    return z.to(p.device, p.dtype, memory_format=memory_format(ae))


def safe_decode(ae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode latents in the autoencoder's own dtype; if a half-precision one overflows (NaN/inf),
    warn and decode again in fp32 (a rare, per-call conversion; `loading.dtypes.vae_dtype` keeps
    the usual overflowing VAEs in fp32 from the start)."""
    dtype = next(ae.parameters()).dtype
    x = ae.decode(autoencoder_input(ae, z))
    if not torch.isfinite(x).all():
        if dtype == torch.float32:
            raise FewstepError("the VAE produced NaN/inf in fp32: the latents are broken (check the model and inputs)")
        warnings.warn(f"VAE decode in {dtype} gave NaN/inf; decoding again in float32", stacklevel=2)
        x = _decode_as(ae, z, torch.float32)
    return x


def _decode_as(ae: torch.nn.Module, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    old = next(ae.parameters()).dtype
    try:
        return ae.to(dtype).decode(z.to(dtype))
    finally:
        ae.to(old)
