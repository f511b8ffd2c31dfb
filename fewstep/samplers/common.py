"""What the samplers share: fresh noise per step from the request's generators, and the ancestral split
of a step into a deterministic part and fresh noise (Ho et al. 2020; k-diffusion's get_ancestral_step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..noise import randn


def default_noise_sampler(x: torch.Tensor, generator=None) -> Callable:
    """Fresh N(0, I) like x for each step, from `generator` (one, or one per image: see `randn`)."""
    return lambda sigma, sigma_next: randn(tuple(x.shape), generator, x.dtype, x.device)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split sigma -> sigma_next into a deterministic step to sigma_down and new noise of std sigma_up
    (sigma_down^2 + sigma_up^2 = sigma_next^2). eta = 1 is DDPM's posterior variance; DDIM's eta
    (Song et al. 2021, eq. 16) is exactly this eta once alphas are written as sigmas."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def log_midpoint(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The midpoint of sigma -> sigma_next in log sigma, sqrt(sigma * sigma_next) (DPM-Solver-2's)."""
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()
