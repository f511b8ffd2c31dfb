"""Samplers of the integer-timestep (VP) schedulers, written in sigmas: DDIM (Song et al. 2021) and DDPM
(Ho et al. 2020), where they are ancestral Euler steps, and LCM's multistep consistency sampling (Luo et
al. 2023) with its boundary condition."""

from __future__ import annotations

import torch
from tqdm.auto import trange

from .common import ancestral_step, default_noise_sampler


@torch.no_grad()
def sample_ddim(denoise, x, sigmas, *, eta=0.0, landing=None, noise_sampler=None, blend=None, callback=None,
                disable=None):
    """DDIM (Song et al. 2021) in sigmas: an Euler step (eta = 0) or an ancestral one (eta > 0).

    `landing[i]` is where step i lands when that is not sigmas[i + 1]: diffusers' DDIM steps to
    t - T // n, then feeds that same VP latent to the next timestep, so the VE latent is rescaled."""
    landing = sigmas[1:] if landing is None else landing
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], landing[i], eta)
        x = denoised + (x - denoised) * (sigma_down / sigmas[i])
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], landing[i]) * sigma_up
        x = x * ((sigmas[i + 1] ** 2 + 1) / (landing[i] ** 2 + 1)) ** 0.5
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


def sample_ddpm(denoise, x, sigmas, *, noise_sampler=None, blend=None, callback=None, disable=None):
    """DDPM ancestral sampling (Ho et al. 2020) with the posterior variance ("fixed_small"): this is
    DDIM with eta = 1 stepping to the next timestep (Song et al. 2021, section 4.1)."""
    return sample_ddim(denoise, x, sigmas, eta=1.0, noise_sampler=noise_sampler, blend=blend, callback=callback,
                       disable=disable)


def lcm_boundary(timesteps: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> torch.Tensor:
    """LCM's consistency-model boundary condition per step, [n, 2] = (c_skip, c_out) (Song et al. 2023)."""
    t = timesteps.double() * timestep_scaling
    return torch.stack([sigma_data ** 2 / (t ** 2 + sigma_data ** 2), t / (t ** 2 + sigma_data ** 2) ** 0.5], dim=1)


@torch.no_grad()
def sample_lcm(denoise, x, sigmas, *, boundary=None, noise_sampler=None, blend=None, callback=None, disable=None):
    """LCM multistep sampling (Luo et al. 2023, Algorithm 1): jump to x0, re-noise to the next sigma.
    `boundary` (from lcm_boundary) mixes in c_skip times the VP latent, as the LCM scheduler does."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if boundary is not None:
            c_skip, c_out = boundary[i]
            denoised = c_skip * x / (sigmas[i] ** 2 + 1) ** 0.5 + c_out * denoised
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x
