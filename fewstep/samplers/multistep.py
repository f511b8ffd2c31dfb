"""Multistep samplers: each step reuses the x0 estimates (or slopes) of the steps before it, so one model
call per step buys a higher order. The history starts empty at the first step of `sigmas` and lives only
inside the function; when `samplers.run` starts late (image to image) that is what diffusers' DPM-Solver
and UniPC do after `set_begin_index`, while its LMS takes its order from the absolute step index and its
PNDM slices its n + 1 timesteps at the step count (docs/samplers.md: fewstep starts them afresh).

References: LMS, the linear multistep method in sigma (k-diffusion's sample_lms; diffusers'
LMSDiscreteScheduler); DPM-Solver++(2M) and its SDE form (Lu et al. 2022, "DPM-Solver++"); UniPC (Zhao et
al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), the bh2 variant of order 2; PLMS (Liu et al.
2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as LDM and diffusers'
PNDMScheduler(skip_prk_steps=True) run it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import trange

from .common import default_noise_sampler


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """The weights of the last `order` slopes (newest first) for step i: the Lagrange basis through
    sigmas[i], sigmas[i - 1], ... integrated over [sigmas[i], sigmas[i + 1]]. Gauss-Legendre with `order`
    nodes is exact for these polynomials of degree order - 1 (diffusers integrates with scipy's quad)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    out = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        out.append(float((b - a) / 2 * (weights * basis).sum()))
    return out


@torch.no_grad()
def sample_lms(denoise, x, sigmas, *, order=4, blend=None, callback=None, disable=None):
    """Linear multistep in sigma on the slopes (x - D) / sigma, of order up to `order` (4, as diffusers)."""
    ds, s = [], sigmas.tolist()
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        ds = (ds + [(x - denoised) / sigmas[i]])[-order:]
        x = x + sum(c * d for c, d in zip(lms_coefficients(s, i, len(ds)), reversed(ds)))
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
def sample_dpmpp_2m_sde(denoise, x, sigmas, *, eta=1.0, noise_sampler=None, blend=None, callback=None,
                        disable=None):
    """DPM-Solver++(2M) SDE, midpoint form (k-diffusion's sample_dpmpp_2m_sde; diffusers'
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")): each step keeps exp(-2h) of the
    latent's noise and draws the rest fresh; the step to sigma = 0 returns the x0 estimate."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            kept = (-(1 + eta) * h).expm1().neg()  # 1 - exp(-2h) at eta = 1
            x = sigmas[i + 1] / sigmas[i] * (-eta * h).exp() * x + kept * denoised
            if old_denoised is not None:
                x = x + 0.5 * kept * (h / h_last) * (denoised - old_denoised)
            # diffusers also draws (and zeroes) noise on the step to sigma 0; nothing draws after that step
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta * h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


def _unipc_predict(x, sigma, sigma_next, ms, sigma_prev, order):
    """UniP (bh2): DPM-Solver++'s step from x at sigma with the newest x0 estimate ms[-1], plus for order 2
    half the divided difference with ms[-2] (at sigma_prev), which makes it DPM-Solver++(2M)."""
    h = sigma.log() - sigma_next.log()
    x = (sigma_next / sigma) * x - (-h).expm1() * ms[-1]
    if order == 2:
        r = (sigma.log() - sigma_prev.log()) / h  # (lambda_prev - lambda) / h, lambda = -log sigma
        x = x - (-h).expm1() * 0.5 * (ms[-2] - ms[-1]) / r
    return x


def _unipc_correct(x_last, sigmas, i, denoised, ms, order):
    """UniC (bh2): step i - 1 retaken from x_last with step i's x0 estimate `denoised` as well, with the
    weights rho of diffusers' multistep_uni_c_bh_update (solved in closed form for order 2)."""
    h = sigmas[i - 1].log() - sigmas[i].log()
    b_h = (-h).expm1()
    x = (sigmas[i] / sigmas[i - 1]) * x_last - b_h * ms[-1]
    if order == 1:
        return x - b_h * 0.5 * (denoised - ms[-1])
    r = (sigmas[i - 1].log() - sigmas[i - 2].log()) / h  # (lambda_{i-2} - lambda_{i-1}) / h
    phi = b_h / -h - 1
    b1 = phi / b_h
    b2 = (phi / -h - 0.5) * 2 / b_h
    rho0 = (b1 - b2) / (1 - r)
    return x - b_h * (rho0 * (ms[-2] - ms[-1]) / r + (b1 - rho0) * (denoised - ms[-1]))


@torch.no_grad()
def sample_unipc(denoise, x, sigmas, *, blend=None, callback=None, disable=None):
    """UniPC, bh2, order 2, x0 prediction (diffusers' UniPCMultistepScheduler defaults): after each model
    call the corrector UniC retakes the previous step with the new x0 estimate (no extra call), then the
    predictor UniP takes the next; first order on the first step and on the step to sigma = 0
    (lower_order_final). As in diffusers, the corrector starts again from the previous corrected latent,
    so an inpainting blend reaches the next step only through the model's input."""
    ms, x_last, order_last = [], None, 1
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        if x_last is not None:
            x = _unipc_correct(x_last, sigmas, i, denoised, ms, order_last)
        ms = (ms + [denoised])[-2:]
        order = 1 if len(ms) < 2 or sigmas[i + 1] == 0 else 2
        x_last, order_last = x, order
        x = _unipc_predict(x, sigmas[i], sigmas[i + 1], ms, sigmas[i - 1] if order == 2 else None, order)
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x


ADAMS_BASHFORTH = ([1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def _pndm_step(x, sigma, source, to, sigma_next, d):
    """diffusers' PNDM transfer in VE terms: it takes the latent to be at `source`, steps with slope d to
    `to` (an Euler / DDIM step), and the next call reads the result at sigma_next."""
    x = x * ((source ** 2 + 1) / (sigma ** 2 + 1)) ** 0.5 + (to - source) * d
    return x * ((sigma_next ** 2 + 1) / (to ** 2 + 1)) ** 0.5


@torch.no_grad()
def sample_plms(denoise, x, sigmas, *, landing=None, retake=None, blend=None, callback=None, disable=None):
    """PLMS: Adams-Bashforth (orders 1 to 4) on the slopes (x - D) / sigma with DDIM's transfer; the first
    step is taken twice, the second time with the mean of its slope and the slope where it landed (LDM's
    PLMS, diffusers' PNDMScheduler with skip_prk_steps: n + 1 model calls for n steps).

    `landing[i]` / `retake[i]`: where diffusers' step i lands, and where it takes the latent of a retaken
    first step to be (both the schedule's own sigmas, but with linspace / trailing spacing; see
    `schedules.Schedule`). The slopes are noise estimates whatever the model predicts; diffusers' PNDM
    combines raw v outputs for v-prediction models, so the two agree for epsilon models only."""
    landing = sigmas[1:] if landing is None else landing
    retake = sigmas[:-1] if retake is None else retake
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised, sigmas[i])
        ds = (ds + [(x - denoised) / sigmas[i]])[-4:]
        if i == 0 and len(sigmas) > 2:
            x_2 = _pndm_step(x, sigmas[0], sigmas[0], landing[0], sigmas[1], ds[0])
            if blend is not None:
                x_2 = blend(0, x_2, sigmas[1])
            d_2 = (x_2 - denoise(x_2, sigmas[1])) / sigmas[1]
            x = _pndm_step(x, sigmas[0], retake[0], sigmas[1], sigmas[1], (ds[0] + d_2) / 2)
        else:
            d = sum(c * d for c, d in zip(ADAMS_BASHFORTH[len(ds) - 1], reversed(ds)))
            x = _pndm_step(x, sigmas[i], sigmas[i], landing[i], sigmas[i + 1], d)
        if blend is not None:
            x = blend(i, x, sigmas[i + 1])
    return x
