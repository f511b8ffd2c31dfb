"""What a benchmark child process needs from either library: a loaded pipeline reduced to a Runner,
the dtype names, and the initial latents both libraries start from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Runner:
    """A loaded pipeline reduced to what `child.measure` needs."""

    generate: Callable[[], torch.Tensor]  # one end-to-end call with the job's prompt and latents
    to_uint8: Callable[[torch.Tensor], object]  # its output -> numpy uint8 [N, H, W, 3]
    encoders: list[torch.nn.Module]
    decoder: torch.nn.Module | None
    load_s: float
    compile_s: float = 0.0  # the compile call itself (compilation happens in the first image)


def initial_latents(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The same unit-variance noise for every library and process."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
