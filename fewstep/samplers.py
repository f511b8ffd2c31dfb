"""Samplers as plain functions `sample_x(denoise, x, sigmas, ...)`, after k-diffusion's sampling.py.

`denoise(x, sigma)` returns the x0 estimate for the VE latent x = x0 + sigma * noise; `sigmas` is a
float64 tensor [n + 1] from `schedules.schedule`, ending where sampling stops. No sampler keeps state
between calls; `callback(i, x, denoised, sigma)` sees every step (for previews).

References: Euler / Heun / ancestral steps from Karras et al. 2022 and k-diffusion; DDIM (Song et
al. 2021) and DDPM (Ho et al. 2020) rewritten in sigmas, where they are ancestral Euler steps;
DPM-Solver++(2M) (Lu et al. 2022); LCM multistep consistency sampling (Luo et al. 2023). Every
sampler takes an optional `blend(i, x, sigma_next) -> x`, applied after each step's update where
diffusers' inpainting loop mixes the source back in (4-channel UNets). `run` is
the one entry the pipeline calls: it reads the sampler's row of `SAMPLERS`, builds the schedule the
matching diffusers scheduler would and starts and ends in the same latent space, so fewstep and
diffusers agree to float rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import trange

from .configs import SchedulerConfig
from .errors import FewstepError
from .noise import randn
from .schedules import schedule


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


@torch.no_grad()
def sample_dpmpp_2m(denoise, x, sigmas, *, blend=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022) in log-sigma time; first order on the first and last step
    (diffusers' lower_order_final with final sigma 0)."""
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] > 0:
            r = (t + sigmas[i - 1].log()) / h  # h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


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


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, which diffusers scheduler's schedule it walks, what it needs, and its
    names in diffusers and in A1111 (None where A1111 has none)."""

    sample: Callable
    family: str  # schedules.FAMILIES: whose timesteps and sigmas
    stochastic: bool  # draws fresh noise at each step (from the request's generators)
    karras: bool  # has a Karras-sigmas variant
    diffusers: str  # the diffusers scheduler class that gives the same numbers
    a1111: str | None


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(sample_euler, "k", False, True, "EulerDiscreteScheduler", "Euler"),
    "euler_a": SamplerSpec(sample_euler_ancestral, "k", True, True, "EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerSpec(sample_heun, "k", False, True, "HeunDiscreteScheduler", "Heun"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "dpm", False, True, "DPMSolverMultistepScheduler", "DPM++ 2M"),
    "ddim": SamplerSpec(sample_ddim, "ddim", True, False, "DDIMScheduler", "DDIM"),  # stochastic when eta > 0
    "ddpm": SamplerSpec(sample_ddpm, "ddpm", True, False, "DDPMScheduler", None),
    "lcm": SamplerSpec(sample_lcm, "lcm", True, False, "LCMScheduler", "LCM"),
}


def spec(name: str) -> SamplerSpec:
    """The table entry of sampler `name`, or a one-line error listing the known ones."""
    if name not in SAMPLERS:
        raise FewstepError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


# diffusers schedulers fewstep has no sampler for, and the nearest one it has (same schedule family and order).
NEAREST = {"PNDMScheduler": "euler", "LMSDiscreteScheduler": "euler", "EDMEulerScheduler": "euler",
           "KDPM2DiscreteScheduler": "heun", "KDPM2AncestralDiscreteScheduler": "euler_a",
           "DPMSolverSinglestepScheduler": "dpmpp_2m", "DPMSolverSDEScheduler": "dpmpp_2m",
           "UniPCMultistepScheduler": "dpmpp_2m", "DEISMultistepScheduler": "dpmpp_2m", "TCDScheduler": "lcm"}


def for_scheduler(class_name: str) -> str:
    """The sampler that gives the numbers of the diffusers scheduler `class_name`; for one fewstep does not
    have, the nearest it has (`NEAREST`, else Euler), with a one-line notice naming it."""
    exact = next((name for name, s in SAMPLERS.items() if s.diffusers == class_name), None)
    if exact is not None:
        return exact
    nearest = NEAREST.get(class_name, "euler")
    warnings.warn(f"the model's scheduler {class_name} is not one of fewstep's samplers: sampling with {nearest}, "
                  f"the nearest (choose another with sampler=... / --sampler)", stacklevel=2)
    return nearest


def cut(name: str, sched: SchedulerConfig, steps: int, karras: bool | None, denoising_start: float | None,
        denoising_end: float | None) -> tuple[int, int]:
    """The steps [start, end) that run when sampling stops early (`denoising_end`, the SDXL base of a base +
    refiner pair) or begins late (`denoising_start`, the refiner): diffusers' rule, a cut at timestep
    round(T - fraction * T), the steps at or above it before, the ones below it after."""
    s = spec(name)
    ts = schedule(s.family, sched, steps, s.karras and (sched.use_karras_sigmas if karras is None else karras)).timesteps
    T = sched.num_train_timesteps
    start = 0 if denoising_start is None else int((ts >= round(T - denoising_start * T)).sum())
    end = steps if denoising_end is None else int((ts >= round(T - denoising_end * T)).sum())
    return start, end


def run(name: str, denoise, noise: torch.Tensor, sched: SchedulerConfig, steps: int, *, karras: bool | None = None,
        eta: float = 0.0, generator: torch.Generator | list[torch.Generator] | None = None,
        callback: Callable | None = None, progress: bool = False, start: int = 0, end: int | None = None,
        x0: torch.Tensor | None = None, noisy: torch.Tensor | None = None, blend: Callable | None = None
        ) -> torch.Tensor:
    """Sample with `name` from unit-variance `noise`; returns latents as diffusers hands them to the VAE.

    `denoise(x, sigma, t=None)` is a `Denoiser`. `karras=None` follows the config's use_karras_sigmas
    (for the samplers that have Karras sigmas). `eta` is DDIM's; `generator` draws the fresh noise of
    stochastic samplers: one for the whole batch, or one per image (image i's noise from generator i,
    so an image of a batch is the image made alone, as diffusers does with a list of generators).
    Image-to-image: `start` skips the schedule's first steps and `x0` (clean latents) starts the rest
    from x0 + sigma * noise, diffusers' `add_noise`; `blend` is the samplers' per-step hook. `end` stops
    before the schedule does; the latents are then as diffusers leaves them (VE for the Euler family, VP
    for the others), and `noisy` takes such latents up again at step `start` (see `cut`)."""
    s = spec(name)
    if karras is None:
        karras = sched.use_karras_sigmas and s.karras
    if karras and not s.karras:
        raise FewstepError(f"Karras sigmas apply to {', '.join(n for n, x in SAMPLERS.items() if x.karras)}, not {name}")
    sch = schedule(s.family, sched, steps, karras)
    exact_t = dict(zip(sch.sigmas.tolist(), sch.timesteps.tolist()))  # [n + 1] vs [n]: last unused

    def denoise_at(x, sigma):  # the schedule knows the exact t diffusers feeds the model at this sigma
        return denoise(x, sigma, t=exact_t.get(float(sigma)))

    sigmas = sch.sigmas[start:None if end is None else end + 1]
    x = _first(s, sch, sigmas[0], noise, x0, noisy)
    options = {"callback": callback, "disable": not progress, "blend": blend}
    if s.stochastic:
        options["noise_sampler"] = default_noise_sampler(x, generator)
    if s.family == "ddim":
        options.update(eta=eta, landing=sch.landing[start:end])
    if s.family == "lcm":
        options["boundary"] = lcm_boundary(sch.timesteps[start:end], sched.timestep_scaling)
    x = s.sample(denoise_at, x, sigmas, **options)
    if s.family == "k":  # VE, as diffusers' Euler-family schedulers keep it (the same at sigma 0)
        return x
    return x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # back to VP space (DDIM may stop above sigma 0)


def _first(s: SamplerSpec, sch, sigma: torch.Tensor, noise: torch.Tensor, x0, noisy) -> torch.Tensor:
    """The VE latent sampling starts from: noise at the schedule's first sigma, a clean x0 noised to `sigma`,
    or latents left by an earlier run (VE for the Euler family, VP for the others)."""
    if noisy is not None:
        return noisy if s.family == "k" else noisy * math.sqrt(sigma.item() ** 2 + 1)
    return noise * sch.init_sigma if x0 is None else x0 + noise * sigma
