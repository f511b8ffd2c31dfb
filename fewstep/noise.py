"""Gaussian noise drawn the way diffusers draws it, so a seed means the same image in both stacks.

`randn_tensor` in diffusers draws on the generator's device and then moves the result (one CPU seed gives
the same image on any device); with a list of generators, row i comes from generator i. fewstep gives
each image its own generator (seed + i): it draws the image's initial noise, the sample of its encoded
source image, and every later step's fresh noise, in diffusers' order.
"""

from __future__ import annotations

import torch


def randn(shape: tuple[int, ...], generator=None, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, I) of `shape`, from one generator or a list of them (one per row)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=on).to(device)
