"""One-step samplers in sigma, after k-diffusion's sampling.py: Euler, Euler ancestral and Heun (Karras et
al. 2022); DPM2 and DPM2 ancestral (DPM-Solver-2, Lu et al. 2022, as Karras et al. and k-diffusion run
it: a midpoint in log sigma); DPM++ SDE (DPM-Solver++(2S) with noise, Lu et al. 2022 / k-diffusion's
sample_dpmpp_sde). Each step uses only the current latent; two-call samplers blend after the first call too,
as diffusers' inpainting loop does after each of the scheduler's half-steps.

`mids[i]`, where a sampler takes it, is the sigma of step i's second model call; None computes it as
k-diffusion does. `samplers.run` passes diffusers' float32 midpoints (`schedules.Schedule.mids`), so the
model is fed diffusers' timesteps there too.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange

from .common import ancestral_step, default_noise_sampler, log_midpoint


@torch.no_grad()
def sample_euler(denoise, x, sigmas, *, blend=None, callback=None, disable=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise, x, sigmas, *, eta=1.0, noise_sampler=None, blend=None, callback=None,
                           disable=None):
    """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion; SDXL-Turbo's sampler)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_heun(denoise, x, sigmas, *, blend=None, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the step to sigma = 0 is Euler."""
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            if blend is not None:  # as diffusers blends after each scheduler call, the predictor's too
                x_2 = blend(i, x_2, sigmas[i + 1])
            d_2 = (x_2 - denoise(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


def _midpoint_step(denoise, x, d, sigma, mid, target, blend, i, sigma_next):
    """x + d_mid * (target - sigma), d_mid the slope at the half step to `mid` (DPM-Solver-2's update).
    The half step is blended at sigma_next, as diffusers blends after its first half-step."""
    x_2 = x + d * (mid - sigma)
    if blend is not None:
        x_2 = blend(i, x_2, sigma_next)
    return x + (x_2 - denoise(x_2, mid)) / mid * (target - sigma)


@torch.no_grad()
def sample_dpm_2(denoise, x, sigmas, *, mids=None, blend=None, callback=None, disable=None):
    """DPM2: DPM-Solver-2 in sigma, the slope taken at the log-midpoint; the step to sigma = 0 is Euler
    (k-diffusion's sample_dpm_2; diffusers' KDPM2DiscreteScheduler, whose interleaved timesteps
    t0, t_mid0, t1, t_mid1, ... are these calls). Where they differ fewstep follows diffusers, through the
    schedule: Karras timesteps rounded to integers, midpoints and their timesteps computed in float32."""
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            mid = log_midpoint(sigmas[i], sigmas[i + 1]) if mids is None else mids[i]
            x = _midpoint_step(denoise, x, d, sigmas[i], mid, sigmas[i + 1], blend, i, sigmas[i + 1])
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise, x, sigmas, *, mids=None, eta=1.0, noise_sampler=None, blend=None, callback=None,
                           disable=None):
    """DPM2 ancestral: the DPM2 step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    sample_dpm_2_ancestral; diffusers' KDPM2AncestralDiscreteScheduler). Where they differ fewstep follows
    diffusers: no draw on the step to sigma 0 (k-diffusion draws one and scales it by 0), so a generator's
    draws line up; its midpoints and their timesteps come from `mids`, computed in float32 as diffusers does."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            mid = log_midpoint(sigmas[i], sigma_down) if mids is None else mids[i]
            x = _midpoint_step(denoise, x, d, sigmas[i], mid, sigma_down, blend, i, sigmas[i + 1])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise, x, sigmas, *, mids=None, eta=1.0, noise_sampler=None, blend=None, callback=None,
                     disable=None):
    """DPM++ SDE: DPM-Solver++(2S) with ancestral noise at both stages (k-diffusion's sample_dpmpp_sde,
    r = 1/2; diffusers' DPMSolverSDEScheduler); the step to sigma = 0 is Euler. Both draw the noise from
    a Brownian tree so that it varies smoothly with the step count; any independent N(0, I) per draw
    gives a valid sampler of the same SDE, and fewstep draws it from the request's generators (so a
    seed means one image on any device, and image i of a batch is image i made alone)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        else:
            mid = log_midpoint(sigmas[i], sigmas[i + 1]) if mids is None else mids[i]
            sigma_down, sigma_up = ancestral_step(sigmas[i], mid, eta)
            x_2 = denoised + (sigma_down / sigmas[i]) * (x - denoised) + noise_sampler(sigmas[i], mid) * sigma_up
            if blend is not None:
                x_2 = blend(i, x_2, sigmas[i + 1])
            denoised_2 = denoise(x_2, mid)
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
            x = denoised_2 + (sigma_down / sigmas[i]) * (x - denoised_2)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x
