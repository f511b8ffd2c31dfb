"""How much working memory a generation needs, and how much the device has: checked before any work
starts, so an impossible size is refused at once with the limit in the message instead of running for
minutes or being killed.

The estimate is deliberately simple and on the generous side of what runs: activations grow with the
pixels of the batch, and the largest are the VAE decoder's full-resolution feature maps (its widest
top level, four tensors alive at once, in fp32 in the worst case) or the UNet's top level (its skips
and block activations for the guidance-doubled batch); attention runs through
`scaled_dot_product_attention`, whose CPU and GPU kernels work in tiles, so no L x L score matrix is
counted. On top come what the call returns (every image, kept until the end) and the latents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FewstepError

GIB = 2**30
DECODER_LIVE = 4  # full-resolution decoder tensors alive at once (input, conv out, norm, upsampled)
UNET_LIVE = 12  # top-level UNet tensors alive at once (three skips, resnet and transformer activations)


@dataclass(frozen=True)
class Work:
    """The shape of one generation, as far as memory goes."""

    width: int
    height: int
    images: int  # in the whole call
    batch: int  # per model call
    guided: bool  # classifier-free guidance doubles the UNet's batch
    unet_channels: int  # the UNet's top-level width
    decoder_channels: int  # the decoder's full-resolution width
    latent_channels: int
    latent_scale: int  # pixels per latent
    itemsize: int  # bytes per UNet value
    output_bytes_per_pixel: int  # 3 for PIL images, 12 for float tensors


def needed_bytes(w: Work) -> int:
    pixels = w.width * w.height
    latent_pixels = pixels // w.latent_scale**2
    unet = w.batch * (2 if w.guided else 1) * w.unet_channels * latent_pixels * w.itemsize * UNET_LIVE
    decoder = w.batch * w.decoder_channels * pixels * 4 * DECODER_LIVE
    kept = w.images * (pixels * w.output_bytes_per_pixel + latent_pixels * w.latent_channels * 4)
    return max(unet, decoder) + kept


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory, or the system's available memory (Linux's
    MemAvailable; elsewhere the free physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not refuse


def check(w: Work, device: torch.device) -> None:
    """Refuse, in one line, work that cannot fit in the device's free memory, naming the largest square
    size (at this batch) that would."""
    need, have = needed_bytes(w), available_bytes(device)
    if need <= have:
        return
    side = int((w.width * w.height * have / need) ** 0.5) // 8 * 8
    hint = f"at most about {side}x{side} at this batch" if side >= 8 else "a smaller batch or fewer images"
    raise FewstepError(f"{w.width}x{w.height}, {w.images} image(s) ({w.batch} per model call) needs about "
                       f"{need / GIB:.1f} GiB of working memory and {device.type} has {have / GIB:.1f} GiB free: "
                       f"ask for {hint}")
