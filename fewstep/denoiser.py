"""The denoiser: a raw diffusion model (eps, v or x0 prediction) seen as D(x, sigma) -> x0.

Follows the k-diffusion `DiscreteEpsDDPMDenoiser` / sgm `Denoiser` design: x = x0 + sigma * noise
("VE" form, Karras et al. 2022), and this is the ONE place that applies the preconditioning

    D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)

for the three parameterisations (Salimans & Ho 2022 for v). c_in = 1 / sqrt(sigma^2 + 1) turns the
VE latent back into the VP latent the UNet was trained on, and c_noise is the training timestep t.
Samplers only ever see x0 estimates, so they do not care what the network predicts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .configs import SchedulerConfig
from .schedules import sigma_to_t, training_sigmas


def scalings(sigma: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) for sigma, so x0 = c_skip * x + c_out * model(c_in * x)."""
    c_in = 1 / (sigma ** 2 + 1) ** 0.5
    if prediction_type == "epsilon":  # x0 = x - sigma * eps
        return torch.ones_like(sigma), -sigma, c_in
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma_vp * x0, in VE units
        return 1 / (sigma ** 2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in  # "sample": the model predicts x0


class Denoiser:
    """Wrap `model_fn(x_in, t) -> eps | v | x0` (per `sched.prediction_type`) as `denoise(x, sigma)`.

    `t` is the timestep the model is fed: pass the exact one when the schedule knows it (diffusers
    feeds integer or float32-rounded timesteps that log-sigma interpolation only reproduces to ~1e-4);
    without it, t = sigma_to_t(sigma) over the training sigmas, as k-diffusion does.
    """

    def __init__(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sched: SchedulerConfig):
        self.model_fn = model_fn
        self.prediction_type = sched.prediction_type
        self.log_sigmas = np.log(training_sigmas(sched).double().numpy())

    def sigma_to_t(self, sigma: float) -> float:
        return float(sigma_to_t(np.array([float(sigma)]), self.log_sigmas)[0])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, t: float | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        c_skip, c_out, c_in = scalings(sigma, self.prediction_type)
        t = self.sigma_to_t(sigma) if t is None else t
        t = torch.tensor(t, dtype=torch.float32, device=x.device)  # the UNet embeds t in float32
        out = self.model_fn(x * c_in, t)
        return (x * c_skip + out * c_out).to(x.dtype)
