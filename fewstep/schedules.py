"""Noise schedules: the training betas / alphas_cumprod / sigmas, and the inference timesteps and
sigmas each sampler walks, computed exactly as the matching diffusers scheduler computes them.

Conventions follow k-diffusion (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): a noisy latent is x = x0 + sigma * noise ("VE" form) with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod); a schedule is a tensor of sigmas that ends
where sampling stops (0, except DDIM / PNDM with set_alpha_to_one=False).

Why the per-family code: diffusers' schedulers do not agree with each other. Euler-type schedulers
use fractional timesteps for "linspace" and interpolate sigma linearly in t; DDIM / DDPM / PNDM round
to integers; DPM-Solver and UniPC space n + 1 points and drop one, and round their Karras timesteps
(UniPC even for the cosine schedule); KDPM2 rounds its Karras timesteps too and interleaves midpoints;
DPMSolverSDE keeps float64 timesteps; LCM ignores the spacing and picks from its
`original_inference_steps` grid. The code below mirrors each one (dtype for dtype: float32 where
diffusers keeps float32) so fewstep feeds the UNet the same t.

Sigma schedules beside the model's own spacing (`SIGMA_SCHEDULES`, for the families that walk free
sigmas): "karras" (Karras et al. 2022, eq. 5), "exponential" (evenly spaced in log sigma: diffusers'
`use_exponential_sigmas`), "sgm_uniform" (ComfyUI's `normal_scheduler(sgm=True)` and A1111's "SGM
Uniform": n + 1 timesteps evenly from T - 1 to 0, the last dropped, sigma log-linearly interpolated
at each) and "ays" (Align Your Steps, Sabour et al. 2024: NVIDIA's published 10-step sigmas for SD 1.5
and SDXL, log-linearly interpolated to n + 1 points as ComfyUI's AlignYourStepsScheduler does, the
last set to 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .configs import SchedulerConfig
from .errors import FewstepError

# The diffusers scheduler families whose timesteps and sigmas `schedule` reproduces: "k" (Euler, Euler
# ancestral, Heun, LMS), "kdpm2" / "kdpm2_a" (KDPM2 and its ancestral form), "sde" (DPMSolverSDE),
# "dpm" (DPM-Solver multistep), "unipc", "ddim", "pndm", "ddpm" and "lcm". Which sampler uses which
# is in `samplers.SAMPLERS`.
FAMILIES = ("k", "kdpm2", "kdpm2_a", "sde", "dpm", "unipc", "ddim", "pndm", "ddpm", "lcm")
KARRAS_FAMILIES = ("k", "kdpm2", "kdpm2_a", "sde", "dpm", "unipc")  # free sigmas: every SIGMA_SCHEDULES applies
VE_FAMILIES = ("k", "kdpm2", "kdpm2_a", "sde")  # diffusers keeps their latents in VE space (the others: VP)
SIGMA_SCHEDULES = ("karras", "exponential", "sgm_uniform", "ays")
# Align Your Steps' 10-step sigmas (Sabour et al. 2024; the values of NVIDIA's how-to page, to the digits
# ComfyUI's nodes_align_your_steps.py carries them); the last, sigma_min, is replaced by 0.
AYS = {"sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
       "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)}


class Schedule(NamedTuple):
    timesteps: torch.Tensor  # [n] float64: the t the model gets at step i (diffusers' value, float32-exact)
    sigmas: torch.Tensor  # [n + 1] float64: sigma at step i, then where sampling ends
    landing: torch.Tensor  # [n] where step i lands: sigmas[1:], except DDIM / PNDM (t - T // n, see ddim_timesteps)
    init_sigma: float  # the starting latent is noise * init_sigma (VE space), as diffusers' init_noise_sigma
    mids: torch.Tensor | None = None  # [n] KDPM2 / DPMSolverSDE: the sigma of step i's second model call (0: none)
    mid_timesteps: torch.Tensor | None = None  # [n] the t diffusers feeds the model at mids[i]
    retake: torch.Tensor | None = None  # [n] PNDM: the sigma its first step is retaken from, were it step i


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


def sigma_to_t32(sigma: torch.Tensor, log_sigmas: np.ndarray) -> torch.Tensor:
    """`sigma_to_t` as diffusers' KDPM2 schedulers run it on float32 tensors: every step in float32."""
    log_sigma = torch.from_numpy(np.log(np.maximum(sigma.numpy(), 1e-10)))
    ls = torch.from_numpy(log_sigmas)
    low = torch.from_numpy(np.cumsum((log_sigma - ls[:, None] >= 0).numpy(), axis=0).argmax(axis=0)).clamp(
        max=len(ls) - 2)
    w = ((ls[low] - log_sigma) / (ls[low] - ls[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho), from sigma_max down."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas evenly spaced in log sigma, from sigma_max down (diffusers' `_convert_to_exponential`)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sgm_uniform(train: np.ndarray, n: int) -> np.ndarray:
    """The n nonzero sigmas of "SGM Uniform" (ComfyUI comfy/samplers.py normal_scheduler(sgm=True), A1111
    modules/sd_schedulers.py sgm_uniform): n + 1 timesteps evenly from T - 1 to 0, the last dropped; sigma
    at each by linear interpolation of log sigma between the training timesteps."""
    ts = np.linspace(len(train) - 1, 0, n + 1)[:-1]
    return np.exp(np.interp(ts, np.arange(len(train)), np.log(train.astype(np.float64))))


def ays_sigmas(model: str, n: int) -> np.ndarray:
    """The n nonzero sigmas of Align Your Steps for `model` ("sd15" | "sdxl"): the published 10-step list,
    log-linearly interpolated to n + 1 points unless n = 10 (ComfyUI's loglinear_interp)."""
    levels = np.array(AYS[model])
    if n + 1 != len(levels):
        xs, new = np.linspace(0, 1, len(levels)), np.linspace(0, 1, n + 1)
        levels = np.exp(np.interp(new, xs, np.log(levels[::-1])))[::-1]
    return levels[:-1].copy()


def spaced_timesteps(spacing: str, n: int, T: int, offset: int, round_linspace: bool) -> np.ndarray:
    """Timesteps of Table 2 of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed"), descending, as diffusers writes them. Only "leading" adds steps_offset."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts.astype(np.float32))[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy() + offset
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _free(kind: str, lo: float, hi: float, n: int, train: np.ndarray, ays_model: str):
    """(timesteps or None, sigmas [n] float64) of sigma schedule `kind` over [lo, hi] (Karras, exponential;
    None: each family turns them into timesteps its own way) or of its own (SGM Uniform, AYS: diffusers
    has neither but takes any sigmas, as EulerDiscreteScheduler.set_timesteps(sigmas=...) does: float32,
    with t = sigma_to_t(sigma), fractional in every family, as k-diffusion and A1111 feed them)."""
    if kind == "karras":
        return None, karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return None, exponential_sigmas(lo, hi, n)
    sigmas = sgm_uniform(train, n) if kind == "sgm_uniform" else ays_sigmas(ays_model, n)
    return sigma_to_t(sigmas.astype(np.float32), np.log(train)), sigmas


def _k_schedule(family: str, sched: SchedulerConfig, n: int, kind: str | None, train: np.ndarray, ays_model: str):
    """Euler-type (Euler, Euler a, Heun, LMS, KDPM2, DPMSolverSDE): sigma interpolated linearly in the
    spaced t; another sigma schedule spans the same range, then t comes from log sigma. DPMSolverSDE
    keeps float64 timesteps; KDPM2 rounds its Karras ones."""
    if family == "sde" and sched.timestep_spacing == "linspace":  # float64, where the others round to float32
        ts = np.linspace(0, len(train) - 1, n)[::-1].copy()
    else:
        ts = spaced_timesteps(sched.timestep_spacing, n, len(train), sched.steps_offset, False)
        ts = ts.astype(np.float64 if family == "sde" else np.float32)
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if kind is not None:
        own_ts, sigmas = _free(kind, sigmas[-1].item(), sigmas[0].item(), n, train, ays_model)
        ts = sigma_to_t(sigmas, np.log(train)) if own_ts is None else own_ts
        if kind == "karras" and family in ("kdpm2", "kdpm2_a"):  # KDPM2*'s set_timesteps: Karras branch only
            ts = ts.round()
        elif family == "k":
            ts = ts.astype(np.float32)
    # diffusers' init_noise_sigma: sigma_max for linspace / trailing, sqrt(sigma_max^2 + 1) for leading.
    top = sigmas.max()
    init = top if sched.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
    return ts, sigmas, float(init)


def _dpm_timesteps(sched: SchedulerConfig, n: int, T: int) -> np.ndarray:
    """DPM-Solver++ / UniPC space n + 1 points for linspace / leading and drop the last (t = 0)."""
    if sched.timestep_spacing == "trailing":
        return spaced_timesteps("trailing", n, T, 0, True).astype(np.int64)
    ts = spaced_timesteps(sched.timestep_spacing, n + 1, T, 0, True)[:-1]
    return (ts + (sched.steps_offset if sched.timestep_spacing == "leading" else 0)).astype(np.int64)


def _dpm_schedule(family: str, sched: SchedulerConfig, n: int, kind: str | None, train: np.ndarray, ays_model: str):
    ts = _dpm_timesteps(sched, n, len(train))
    if kind is None:
        return ts, np.interp(ts, np.arange(len(train)), train)
    # Karras / exponential over the whole training range, not the spaced timesteps (unlike Euler)
    own_ts, sigmas = _free(kind, train[0].item(), train[-1].item(), n, train, ays_model)
    if own_ts is not None:  # SGM Uniform, AYS: diffusers has neither; the fractional t, as k-diffusion
        return own_ts, sigmas
    ts = sigma_to_t(sigmas, np.log(train))
    # DPMSolverMultistep rounds Karras timesteps except under squaredcos_cap_v2; UniPCMultistep always does
    if kind == "karras" and (family == "unipc" or sched.beta_schedule != "squaredcos_cap_v2"):
        ts = ts.round()
    return ts.astype(np.int64), sigmas  # diffusers stores int64 timesteps: fractional ones truncate


def _kdpm2_mids(family: str, sigmas: np.ndarray, log_train: np.ndarray):
    """KDPM2's midpoints, in float32 as its set_timesteps computes them (`sigmas_interpol`): between sigma_i
    and sigma_i+1 (log-midpoint), or for the ancestral form between sigma_i and its sigma_down; 0 on the
    last step (Euler to 0). Their timesteps come from float32 sigma_to_t (k-diffusion: float64)."""
    s = torch.from_numpy(sigmas.astype(np.float32))  # [n + 1], ends in 0
    if family == "kdpm2":
        mids = s.log().lerp(s.roll(1).log(), 0.5).exp()[1:]
    else:
        nxt = torch.cat([s[1:], s.new_zeros(1)])
        up = (nxt ** 2 * (s ** 2 - nxt ** 2) / s ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        mids = s.log().lerp(down.log(), 0.5).exp()[:-1]
        mids[-1] = 0.0
    return mids.double(), sigma_to_t32(mids, log_train).double()


def _sde_mids(sigmas64: np.ndarray, log_train: np.ndarray):
    """DPMSolverSDE's midpoints sqrt(sigma_i * sigma_i+1): the sigma in float32 (as its step computes it),
    the timestep from the float64 sigmas (as its set_timesteps computes it); 0 on the last step."""
    s = torch.from_numpy(np.concatenate([sigmas64, [0.0]]).astype(np.float32))
    t, t_next = s[:-1].log().neg(), s[1:].log().neg()
    mids = (t + (t_next - t) * 0.5).neg().exp()
    mids[-1] = 0.0
    lam = -np.log(sigmas64)
    mid_t = sigma_to_t(np.exp(-(lam[:-1] + np.diff(lam) * 0.5)), log_train)
    return mids.double(), torch.from_numpy(np.concatenate([mid_t, [0.0]]))


def ddim_timesteps(sched: SchedulerConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """DDIM's (and PNDM's) timesteps and where each step lands: t - T // n whatever the spacing, which need
    not be the next timestep (e.g. linspace); below 0 it lands on the final alpha (-1 stands for it here)."""
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


def _ddim_schedule(family: str, sched: SchedulerConfig, n: int, ac: torch.Tensor):
    """DDIM and PNDM: integer timesteps, landing at t - T // n. PNDM (skip_prk_steps) retakes its first
    step from t_1 + T // n (not t_0 with linspace / trailing spacing) to t_1 with the mean of two slopes."""
    ts, prev = ddim_timesteps(sched, n)
    final = 1.0 if sched.set_alpha_to_one else ac[0].item()
    landing = _vp_sigmas(ac, prev, final)
    sigmas = np.concatenate([_vp_sigmas(ac, ts, final), landing[-1:]])
    retake = None
    if family == "pndm":
        src = np.minimum(ts[1:] + sched.num_train_timesteps // n, sched.num_train_timesteps - 1)
        retake = torch.from_numpy(np.concatenate([_vp_sigmas(ac, src, final), sigmas[-2:-1]]))
    return ts, sigmas, landing, retake


def _kind(karras: bool, sigma_schedule: str | None) -> str | None:
    if sigma_schedule is not None and sigma_schedule not in SIGMA_SCHEDULES:
        raise FewstepError(f"unknown sigma schedule {sigma_schedule!r}; choose one of: {', '.join(SIGMA_SCHEDULES)}")
    if karras and sigma_schedule not in (None, "karras"):
        raise FewstepError(f"karras=True and sigma_schedule={sigma_schedule!r} contradict each other; give one")
    return "karras" if karras else sigma_schedule


def _check(family: str, sched: SchedulerConfig, steps, kind: str | None, ays_model: str) -> None:
    if family not in FAMILIES:
        raise FewstepError(f"unknown schedule family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FewstepError(f"steps={steps!r} must be a whole number >= 1")
    if steps > sched.num_train_timesteps:
        raise FewstepError(f"steps={steps} is more than the model's {sched.num_train_timesteps} training timesteps")
    if family == "lcm" and steps > sched.original_inference_steps:
        raise FewstepError(f"lcm takes at most original_inference_steps={sched.original_inference_steps} steps, "
                           f"got {steps}")
    if kind == "karras" and family not in KARRAS_FAMILIES:
        raise FewstepError(f"Karras sigmas do not apply to the {family} schedule")
    if kind is not None and family not in KARRAS_FAMILIES:
        raise FewstepError(f"the {kind} sigma schedule does not apply to the {family} schedule (integer timesteps)")
    if kind == "ays" and ays_model not in AYS:
        raise FewstepError(f"ays_model={ays_model!r}: choose one of {', '.join(AYS)}")


def schedule(family: str, sched: SchedulerConfig, steps: int, karras: bool = False, sigma_schedule: str | None = None,
             ays_model: str = "sd15") -> Schedule:
    """The timesteps, sigmas and initial noise scale of the diffusers scheduler `family` for `steps` steps;
    `sigma_schedule` (one of SIGMA_SCHEDULES; `karras=True` is "karras") replaces the model's spacing."""
    kind = _kind(karras, sigma_schedule)
    _check(family, sched, steps, kind, ays_model)
    ac, train = alphas_cumprod(sched), training_sigmas(sched).numpy()
    landing = mids = mid_t = retake = None
    if family in VE_FAMILIES:
        ts, sigmas, init = _k_schedule(family, sched, steps, kind, train, ays_model)
        if family == "sde":
            mids, mid_t = _sde_mids(sigmas, np.log(train))
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        if family in ("kdpm2", "kdpm2_a"):
            mids, mid_t = _kdpm2_mids(family, sigmas, np.log(train))
    elif family in ("dpm", "unipc"):
        ts, sigmas = _dpm_schedule(family, sched, steps, kind, train, ays_model)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    elif family in ("ddim", "pndm"):
        ts, sigmas, landing, retake = _ddim_schedule(family, sched, steps, ac)
    else:  # ddpm, lcm: step to the next timestep, end at x0
        ts = lcm_timesteps(sched, steps) if family == "lcm" else spaced_timesteps(
            sched.timestep_spacing, steps, sched.num_train_timesteps, sched.steps_offset, True).astype(np.int64)
        sigmas = np.concatenate([_vp_sigmas(ac, ts, 1.0), [0.0]])
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float64))
    landing = sigmas[1:] if landing is None else torch.from_numpy(landing)
    if family not in VE_FAMILIES:  # VP schedulers start from unit noise in VP space: x_VE = noise * sqrt(sigma^2 + 1)
        init = math.sqrt(sigmas[0].item() ** 2 + 1)
    return Schedule(torch.from_numpy(np.asarray(ts, dtype=np.float64)), sigmas, landing, init, mids, mid_t, retake)
