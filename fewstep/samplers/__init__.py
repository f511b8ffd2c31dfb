"""Samplers as plain functions `sample_x(denoise, x, sigmas, ...)`, after k-diffusion's sampling.py, and the
table that names them.

`denoise(x, sigma)` returns the x0 estimate for the VE latent x = x0 + sigma * noise; `sigmas` is a
float64 tensor [n + 1] from `schedules.schedule`, ending where sampling stops. No sampler keeps state
between calls; `callback(i, x, denoised, sigma)` sees every step (for previews). Every sampler takes an
optional `blend(i, x, sigma_next) -> x`, applied after each step's update where diffusers' inpainting loop
mixes the source back in (4-channel UNets): after each scheduler call, so also after the first call of a
two-call step. The functions live in `singlestep` (Euler, Euler a, Heun, DPM2, DPM2 a, DPM++ SDE),
`multistep` (LMS, DPM++ 2M, DPM++ 2M SDE, UniPC, PLMS) and `vp` (DDIM, DDPM, LCM); docs/samplers.md has
the table with the papers.

`run` is the one entry the pipeline calls: it reads the sampler's row of `SAMPLERS`, builds the schedule
the matching diffusers scheduler would and starts and ends in the same latent space, so fewstep and
diffusers agree to float rounding.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..configs import SchedulerConfig
from ..errors import FewstepError
from ..noise import randn
from ..schedules import VE_FAMILIES, Schedule, schedule
from .common import ancestral_step, default_noise_sampler, log_midpoint
from .multistep import (lms_coefficients, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_lms, sample_plms,
                        sample_unipc)
from .singlestep import (sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_sde, sample_euler,
                         sample_euler_ancestral, sample_heun)
from .vp import lcm_boundary, sample_ddim, sample_ddpm, sample_lcm

__all__ = ["SAMPLERS", "NEAREST", "SamplerSpec", "spec", "for_scheduler", "schedule_of", "cut", "run", "randn",
           "default_noise_sampler", "ancestral_step", "log_midpoint", "lms_coefficients", "lcm_boundary",
           "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_dpmpp_sde", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc",
           "sample_plms", "sample_ddim", "sample_ddpm", "sample_lcm"]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, which diffusers scheduler's schedule it walks, what it needs, and its
    names in diffusers and in A1111 (None where A1111 has none)."""

    sample: Callable
    family: str  # schedules.FAMILIES: whose timesteps and sigmas
    stochastic: bool  # draws fresh noise at each step (from the request's generators)
    karras: bool  # walks free sigmas: Karras sigmas and the other schedules.SIGMA_SCHEDULES apply
    diffusers: str  # the diffusers scheduler class that gives the same numbers
    a1111: str | None


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(sample_euler, "k", False, True, "EulerDiscreteScheduler", "Euler"),
    "euler_a": SamplerSpec(sample_euler_ancestral, "k", True, True, "EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SamplerSpec(sample_heun, "k", False, True, "HeunDiscreteScheduler", "Heun"),
    "lms": SamplerSpec(sample_lms, "k", False, True, "LMSDiscreteScheduler", "LMS"),
    "dpm2": SamplerSpec(sample_dpm_2, "kdpm2", False, True, "KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_a": SamplerSpec(sample_dpm_2_ancestral, "kdpm2_a", True, True, "KDPM2AncestralDiscreteScheduler",
                          "DPM2 a"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "dpm", False, True, "DPMSolverMultistepScheduler", "DPM++ 2M"),
    # DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"); the class alone maps to dpmpp_2m
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "dpm", True, True, "DPMSolverMultistepScheduler", "DPM++ 2M SDE"),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "sde", True, True, "DPMSolverSDEScheduler", "DPM++ SDE"),
    "unipc": SamplerSpec(sample_unipc, "unipc", False, True, "UniPCMultistepScheduler", "UniPC"),
    "plms": SamplerSpec(sample_plms, "pndm", False, False, "PNDMScheduler", "PLMS"),
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
NEAREST = {"EDMEulerScheduler": "euler", "DPMSolverSinglestepScheduler": "dpmpp_2m",
           "DEISMultistepScheduler": "dpmpp_2m", "IPNDMScheduler": "plms", "TCDScheduler": "lcm"}


def for_scheduler(class_name: str) -> str:
    """The sampler that gives the numbers of the diffusers scheduler `class_name` (the first row that names
    it); for one fewstep does not have, the nearest it has (`NEAREST`, else Euler), with a one-line notice."""
    exact = next((name for name, s in SAMPLERS.items() if s.diffusers == class_name), None)
    if exact is not None:
        return exact
    nearest = NEAREST.get(class_name, "euler")
    warnings.warn(f"the model's scheduler {class_name} is not one of fewstep's samplers: sampling with {nearest}, "
                  f"the nearest (choose another with sampler=... / --sampler)", stacklevel=2)
    return nearest


def schedule_of(name: str, sched: SchedulerConfig, steps: int, karras: bool | None = None,
                sigma_schedule: str | None = None, ays_model: str = "sd15") -> Schedule:
    """The schedule sampler `name` walks. `sigma_schedule` (schedules.SIGMA_SCHEDULES) replaces the model's
    spacing; without it, `karras` (None: the config's use_karras_sigmas) says whether it is "karras"."""
    s = spec(name)
    if sigma_schedule is None and karras is None:
        karras = sched.use_karras_sigmas and s.karras
    if karras is False and sigma_schedule == "karras":
        raise FewstepError("karras=False and sigma_schedule='karras' contradict each other; give one")
    free = [n for n, x in SAMPLERS.items() if x.karras]
    if karras and not s.karras:
        raise FewstepError(f"Karras sigmas apply to {', '.join(free)}, not {name}")
    if sigma_schedule is not None and not s.karras:
        raise FewstepError(f"sigma_schedule={sigma_schedule!r} applies to {', '.join(free)}, not {name}")
    return schedule(s.family, sched, steps, bool(karras), sigma_schedule, ays_model)


def cut(name: str, sched: SchedulerConfig, steps: int, karras: bool | None, denoising_start: float | None,
        denoising_end: float | None, sigma_schedule: str | None = None, ays_model: str = "sd15") -> tuple[int, int]:
    """The steps [start, end) that run when sampling stops early (`denoising_end`, the SDXL base of a base +
    refiner pair) or begins late (`denoising_start`, the refiner): diffusers' rule, a cut at timestep
    round(T - fraction * T), the steps at or above it before, the ones below it after."""
    s = spec(name)
    free = s.karras and sigma_schedule is not None
    ts = schedule_of(name, sched, steps, s.karras and karras, sigma_schedule if free else None, ays_model).timesteps
    T = sched.num_train_timesteps
    start = 0 if denoising_start is None else int((ts >= round(T - denoising_start * T)).sum())
    end = steps if denoising_end is None else int((ts >= round(T - denoising_end * T)).sum())
    return start, end


def run(name: str, denoise, noise: torch.Tensor, sched: SchedulerConfig, steps: int, *, karras: bool | None = None,
        sigma_schedule: str | None = None, ays_model: str = "sd15", eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, callback: Callable | None = None,
        progress: bool = False, start: int = 0, end: int | None = None, x0: torch.Tensor | None = None,
        noisy: torch.Tensor | None = None, blend: Callable | None = None) -> torch.Tensor:
    """Sample with `name` from unit-variance `noise`; returns latents as diffusers hands them to the VAE.

    `denoise(x, sigma, t=None)` is a `Denoiser`. `sigma_schedule` ("karras", "exponential", "sgm_uniform",
    "ays"; for the samplers with `karras` in their row) replaces the model's timestep spacing; None:
    `karras` says (None: the config's use_karras_sigmas), `karras=True` being "karras". `ays_model`
    ("sd15" | "sdxl") picks Align Your Steps' published list. `eta` is DDIM's; `generator` draws the
    fresh noise of stochastic samplers: one for the whole batch, or one per image (image i's noise from
    generator i, so an image of a batch is the image made alone, as diffusers does with a list of
    generators). Image-to-image: `start` skips the schedule's first steps and `x0` (clean latents) starts
    the rest from x0 + sigma * noise, diffusers' `add_noise`; `blend` is the samplers' per-step hook. `end`
    stops before the schedule does; the latents are then as diffusers leaves them (VE for the Euler-type
    families, VP for the others), and `noisy` takes such latents up again at step `start` (see `cut`)."""
    s = spec(name)
    sch = schedule_of(name, sched, steps, karras, sigma_schedule, ays_model)
    denoise_at = _exact_t(denoise, sch, start, end)
    sigmas = sch.sigmas[start:None if end is None else end + 1]
    x = _first(s, sch, sigmas[0], noise, x0, noisy)
    options = _options(s, sch, sched, slice(start, end), eta)
    options.update(callback=callback, disable=not progress, blend=blend)
    if s.stochastic:
        options["noise_sampler"] = default_noise_sampler(x, generator)
    x = s.sample(denoise_at, x, sigmas, **options)
    if s.family in VE_FAMILIES:  # VE, as diffusers' Euler-type schedulers keep it (the same at sigma 0)
        return x
    return x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # back to VP space (DDIM / PLMS may stop above sigma 0)


def _exact_t(denoise, sch: Schedule, start: int, end: int | None) -> Callable:
    """`denoise(x, sigma)` feeding the model the exact t diffusers feeds it where the schedule knows it. The
    midpoints of two-call steps come first, in call order: DPM2 ancestral's midpoint is sigma_next itself
    (sqrt(sigma * sigma_down)), up to rounding, yet diffusers gives it its own t."""
    exact_t = dict(zip(sch.sigmas.tolist(), sch.timesteps.tolist()))  # [n + 1] vs [n]: last unused
    mids = {}
    if sch.mids is not None:  # the second call of each two-call step (0 where a step has none)
        for m, t in zip(sch.mids[start:end].tolist(), sch.mid_timesteps[start:end].tolist()):
            mids.setdefault(m, collections.deque()).append(t)

    def denoise_at(x, sigma):
        queue = mids.get(float(sigma))
        return denoise(x, sigma, t=queue.popleft() if queue else exact_t.get(float(sigma)))
    return denoise_at


def _options(s: SamplerSpec, sch: Schedule, sched: SchedulerConfig, steps: slice, eta: float) -> dict:
    """The sampler's schedule-specific arguments for the steps that run."""
    if s.family == "ddim":
        return {"eta": eta, "landing": sch.landing[steps]}
    if s.family == "pndm":
        return {"landing": sch.landing[steps], "retake": sch.retake[steps]}
    if s.family == "lcm":
        return {"boundary": lcm_boundary(sch.timesteps[steps], sched.timestep_scaling)}
    return {} if sch.mids is None else {"mids": sch.mids[steps]}


def _first(s: SamplerSpec, sch: Schedule, sigma: torch.Tensor, noise: torch.Tensor, x0, noisy) -> torch.Tensor:
    """The VE latent sampling starts from: noise at the schedule's first sigma, a clean x0 noised to `sigma`,
    or latents left by an earlier run (VE for the Euler-type families, VP for the others)."""
    if noisy is not None:
        return noisy if s.family in VE_FAMILIES else noisy * math.sqrt(sigma.item() ** 2 + 1)
    return noise * sch.init_sigma if x0 is None else x0 + noise * sigma
