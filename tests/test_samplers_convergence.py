"""Samplers against the exact answer of a world where it is known: Gaussian data x0 ~ N(MU, SD^2) per
element, whose ideal denoiser is linear, D(x, sigma) = MU + SD^2 / (SD^2 + sigma^2) * (x - MU).

Deterministic samplers solve the probability-flow ODE, whose solution is then exact in closed form,
x(sigma) = MU + (x_T - MU) * sqrt(SD^2 + sigma^2) / sqrt(SD^2 + sigma_T^2): halving the step must cut the
error by the sampler's order. Stochastic samplers cannot be compared path by path with another stack
(DPM++ SDE draws from a Brownian tree in diffusers and k-diffusion); their results must have the known
distribution: the final step to sigma = 0 returns D(x, sigma_last), which is N(MU, SD^4 / (SD^2 +
sigma_last^2)) when x has the right law N(MU, SD^2 + sigma_last^2), and the distance to it must shrink as
steps grow (ancestral samplers lose variance at each step: the known few-step bias, of order the step).
"""

import math

import pytest
import torch

from fewstep import samplers, schedules
from fewstep.configs import SchedulerConfig

MU, SD = 0.3, 0.5
pytestmark = pytest.mark.usefixtures("one_thread")  # elementwise work: one thread, on a shared machine


def ideal(x, sigma, t=None):
    """The exact x0 predictor of the Gaussian world (a stand-in for a perfectly trained model)."""
    s = float(sigma)
    return MU + SD ** 2 / (SD ** 2 + s ** 2) * (x - MU)


def flow(x_T, sigma_T: float, sigma: float):
    return MU + (x_T - MU) * math.sqrt(SD ** 2 + sigma ** 2) / math.sqrt(SD ** 2 + sigma_T ** 2)


def deterministic(fn, **kw):
    return lambda denoise, x, sigmas, **k: fn(denoise, x, sigmas, **kw, **k)


# (sampler, its order of convergence on this problem): the stochastic ones with eta = 0 are their ODE
# solvers (DPM-Solver++(2S), DPM-Solver-2, DPM-Solver++(2M)); UniPC's corrector lifts its order-2
# predictor to 3 (Zhao et al. 2023, Theorem 3.1); LMS's warm-up leaves it at 3 over these step counts;
# PLMS's improved-Euler start leaves it at 2.
ORDERS = {
    "euler": (samplers.sample_euler, 1), "heun": (samplers.sample_heun, 2), "lms": (samplers.sample_lms, 3),
    "dpm2": (samplers.sample_dpm_2, 2), "dpmpp_2m": (samplers.sample_dpmpp_2m, 2),
    "unipc": (samplers.sample_unipc, 3), "plms": (samplers.sample_plms, 2),
    "dpmpp_sde(eta=0)": (deterministic(samplers.sample_dpmpp_sde, eta=0.0), 2),
    "dpm2_a(eta=0)": (deterministic(samplers.sample_dpm_2_ancestral, eta=0.0), 2),
    "dpmpp_2m_sde(eta=0)": (deterministic(samplers.sample_dpmpp_2m_sde, eta=0.0), 2),
}


@pytest.mark.parametrize("name", list(ORDERS))
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(name):
    fn, order = ORDERS[name]
    z = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (16, 32, 64):  # log-spaced sigmas from 14.6 to 0.05: every step a regular one (none to 0)
        sigmas = torch.from_numpy(schedules.exponential_sigmas(0.05, 14.6, n + 1))
        x_T = MU + math.sqrt(SD ** 2 + sigmas[0].item() ** 2) * z
        x = fn(ideal, x_T, sigmas, disable=True)
        errors.append((x - flow(x_T, sigmas[0].item(), sigmas[-1].item())).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert min(rates) >= order - 0.3, f"{name}: errors {errors}, observed orders {rates}"
    assert errors[-1] < 0.05


STOCHASTIC = ("euler_a", "dpm2_a", "dpmpp_2m_sde", "dpmpp_sde")


def final_law(name: str, n: int, sample=None):
    """(mean, std, the exact std) of 262,144 samples of `name` run for n steps from the Gaussian world's
    own law at the schedule's first sigma (trailing spacing, the SD noise schedule); `sample` replaces the
    sampler function."""
    c = SchedulerConfig(timestep_spacing="trailing", steps_offset=1)
    sigmas = samplers.schedule_of(name, c, n).sigmas
    shape = (4, 1, 256, 256)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if sample is None:
        x = samplers.run(name, ideal, noise, c, n, x0=torch.full(shape, MU), generator=torch.Generator().manual_seed(2))
    else:
        x = sample(ideal, MU + noise * sigmas[0], sigmas, disable=True)
    x = x.double()
    return x.mean().item(), x.std().item(), SD ** 2 / math.sqrt(SD ** 2 + sigmas[-2].item() ** 2)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reach_the_data_distribution(name):
    """The mean is exact at any step count (to the sampling error, 0.001); the std's bias shrinks as the
    steps grow (measured: 0.013 - 0.05 at 8 steps, 0.001 - 0.018 at 128)."""
    biases = []
    for n in (8, 128):
        mean, std, exact = final_law(name, n)
        assert abs(mean - MU) < 0.004, (n, mean)
        biases.append(abs(std - exact))
    assert biases[1] < biases[0] / 2.5 and biases[1] < 0.025, biases


def test_dpmpp_sde_noise_is_what_makes_its_law():
    """Without its fresh noise DPM++ SDE loses the data's spread (the statistics above can fail)."""
    silent = deterministic(samplers.sample_dpmpp_sde, noise_sampler=lambda sigma, sigma_next: 0.0)
    mean, std, exact = final_law("dpmpp_sde", 16, silent)
    assert abs(mean - MU) < 0.004 and std < exact / 3
