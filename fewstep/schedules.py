"""Noise schedules: the training betas / alphas_cumprod / sigmas, and the inference timesteps and
sigmas each sampler walks, computed exactly as the matching diffusers scheduler computes them.

Conventions follow k-diffusion (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): a noisy latent is x = x0 + sigma * noise ("VE" form) with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod); a schedule is a tensor of sigmas that ends
where sampling stops (0, except DDIM with set_alpha_to_one=False).

Why the per-family code: diffusers' schedulers do not agree with each other. Euler-type schedulers
use fractional timesteps for "linspace" and interpolate sigma linearly in t; DDIM / DDPM round to
integers; DPM-Solver spaces n + 1 points and drops one, and rounds its Karras timesteps; LCM ignores
the spacing and picks from its `original_inference_steps` grid. The numpy below mirrors each one
(dtype for dtype: float32 where diffusers keeps float32) so fewstep feeds the UNet the same t.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .configs import SchedulerConfig
from .errors import FewstepError

# The diffusers scheduler families whose timesteps and sigmas `schedule` reproduces: "k" (Euler, Euler
# ancestral, Heun: fractional timesteps, sigmas interpolated in t), "dpm" (DPM-Solver multistep), "ddim",
# "ddpm" and "lcm". Which sampler uses which is in `samplers.SAMPLERS`.
FAMILIES = ("k", "dpm", "ddim", "ddpm", "lcm")
KARRAS_FAMILIES = ("k", "dpm")


class Schedule(NamedTuple):
    timesteps: torch.Tensor  # [n] float64: the t the model gets at step i (diffusers' value, float32-exact)
    sigmas: torch.Tensor  # [n + 1] float64: sigma at step i, then where sampling ends
    landing: torch.Tensor  # [n] where step i lands: sigmas[1:], except DDIM (t - T // n, see ddim_timesteps)
    init_sigma: float  # the starting latent is noise * init_sigma (VE space), as diffusers' init_noise_sigma


def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 ("squaredcos_cap_v2"), in float64 then float32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def betas(sched: SchedulerConfig) -> torch.Tensor:
    """Training betas [T], float32 as diffusers builds them (the float32 rounding is part of the model)."""
    n = sched.num_train_timesteps
    if sched.trained_betas is not None:
        return torch.tensor(sched.trained_betas, dtype=torch.float32)
    if sched.beta_schedule == "linear":
        return torch.linspace(sched.beta_start, sched.beta_end, n, dtype=torch.float32)
    if sched.beta_schedule == "scaled_linear":
        return torch.linspace(sched.beta_start ** 0.5, sched.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    return betas_for_alpha_bar(n)


def alphas_cumprod(sched: SchedulerConfig) -> torch.Tensor:
    return torch.cumprod(1.0 - betas(sched), dim=0)  # [T] float32


def training_sigmas(sched: SchedulerConfig) -> torch.Tensor:
    """sigma(t) for t = 0 .. T-1, float32 (Euler-type schedulers interpolate these float32 values)."""
    ac = alphas_cumprod(sched)
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma, by linear interpolation in log sigma (k-diffusion / diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho), from sigma_max down."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(spacing: str, n: int, T: int, offset: int, round_linspace: bool) -> np.ndarray:
    """Timesteps of Table 2 of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed"), descending, as diffusers writes them. Only "leading" adds steps_offset."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts.astype(np.float32))[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy() + offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _k_schedule(sched: SchedulerConfig, n: int, karras: bool, train: np.ndarray):
    """Euler / Euler ancestral / Heun: sigma interpolated linearly in t; Karras then t from log sigma."""
    ts = spaced_timesteps(sched.timestep_spacing, n, len(train), sched.steps_offset, False).astype(np.float32)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        ts = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    # diffusers' init_noise_sigma: sigma_max for linspace / trailing, sqrt(sigma_max^2 + 1) for leading.
    top = sigmas.max()
    init = top if sched.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
    return ts, sigmas, float(init)


def _dpm_timesteps(sched: SchedulerConfig, n: int, T: int) -> np.ndarray:
    """DPM-Solver++ spaces n + 1 points for linspace / leading and drops the last (t = 0)."""
    if sched.timestep_spacing == "trailing":
        return spaced_timesteps("trailing", n, T, 0, True).astype(np.int64)
    ts = spaced_timesteps(sched.timestep_spacing, n + 1, T, 0, True)[:-1]
    return (ts + (sched.steps_offset if sched.timestep_spacing == "leading" else 0)).astype(np.int64)


def _dpm_schedule(sched: SchedulerConfig, n: int, karras: bool, train: np.ndarray):
    ts = _dpm_timesteps(sched, n, len(train))
    if karras:  # over the whole training range, not the spaced timesteps (unlike Euler)
        sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
        ts = sigma_to_t(sigmas, np.log(train))
        if sched.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)  # diffusers stores int64 timesteps: fractional ones truncate
    else:
        sigmas = np.interp(ts, np.arange(len(train)), train)
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def ddim_timesteps(sched: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """DDIM's timesteps and where each step lands: t - T // n whatever the spacing, which need not be
    the next timestep (e.g. linspace); below 0 it lands on the final alpha (-1 stands for it here)."""
    T = sched.num_train_timesteps
    ts = spaced_timesteps(sched.timestep_spacing, n, T, sched.steps_offset, True).astype(np.int64)
    return ts, np.maximum(ts - T // n, -1)


def lcm_timesteps(sched: SchedulerConfig, n: int) -> np.ndarray:
    """LCM (Luo et al. 2023): n of the `original_inference_steps` skipping-step timesteps k*i - 1,
    evenly by index; timestep_spacing and steps_offset play no part, as in diffusers."""
    orig = sched.original_inference_steps
    k = sched.num_train_timesteps // orig
    grid = (np.arange(1, orig + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, orig, num=n, endpoint=False)).astype(np.int64)]


def _vp_sigmas(ac: torch.Tensor, ts: np.ndarray, final_alpha: float) -> np.ndarray:
    """sigma at integer timesteps, float64 from diffusers' float32 alphas_cumprod; t = -1: final alpha."""
    a = np.where(ts >= 0, ac.double().numpy()[np.maximum(ts, 0)], final_alpha)
    return np.sqrt((1 - a) / a)


def _check(family: str, sched: SchedulerConfig, steps, karras: bool) -> None:
    if family not in FAMILIES:
        raise FewstepError(f"unknown schedule family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FewstepError(f"steps={steps!r} must be a whole number >= 1")
    if steps > sched.num_train_timesteps:
        raise FewstepError(f"steps={steps} is more than the model's {sched.num_train_timesteps} training timesteps")
    if family == "lcm" and steps > sched.original_inference_steps:
        raise FewstepError(f"lcm takes at most original_inference_steps={sched.original_inference_steps} steps, "
                           f"got {steps}")
    if karras and family not in KARRAS_FAMILIES:
        raise FewstepError(f"Karras sigmas do not apply to the {family} schedule")


def schedule(family: str, sched: SchedulerConfig, steps: int, karras: bool = False) -> Schedule:
    """The timesteps, sigmas and initial noise scale of the diffusers scheduler `family` for `steps` steps."""
    _check(family, sched, steps, karras)
    ac, train = alphas_cumprod(sched), training_sigmas(sched).numpy()
    landing = None
    if family == "k":
        ts, sigmas, init = _k_schedule(sched, steps, karras, train)
    elif family == "dpm":
        ts, sigmas = _dpm_schedule(sched, steps, karras, train)
    elif family == "ddim":
        ts, prev = ddim_timesteps(sched, steps)
        final = 1.0 if sched.set_alpha_to_one else ac[0].item()
        landing = _vp_sigmas(ac, prev, final)
        sigmas = np.concatenate([_vp_sigmas(ac, ts, final), landing[-1:]])
    else:  # ddpm, lcm: step to the next timestep, end at x0
        ts = lcm_timesteps(sched, steps) if family == "lcm" else spaced_timesteps(
            sched.timestep_spacing, steps, sched.num_train_timesteps, sched.steps_offset, True).astype(np.int64)
        sigmas = np.concatenate([_vp_sigmas(ac, ts, 1.0), [0.0]])
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float64))
    landing = sigmas[1:] if landing is None else torch.from_numpy(landing)
    if family != "k":  # VP schedulers start from unit noise in VP space: x_VE = noise * sqrt(sigma^2 + 1)
        init = math.sqrt(sigmas[0].item() ** 2 + 1)
    return Schedule(torch.from_numpy(np.asarray(ts, dtype=np.float64)), sigmas, landing, init)
