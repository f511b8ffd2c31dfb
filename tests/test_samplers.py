"""Parity of fewstep's schedules and samplers with the matching diffusers schedulers.

diffusers is the test-only oracle: (1) timesteps, sigmas and the initial noise scale of every
sampler x spacing x step count x beta schedule (x Karras) equal the scheduler's; (2) whole sampling
loops, driven by one fixed nonlinear stand-in for the UNet and the same injected noise, give the
latents the diffusers pipeline loop gives; (3) bad input raises a one-line FewstepError.
"""

import inspect
import json
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LCMScheduler)

from fewstep import samplers, schedules
from fewstep.configs import SchedulerConfig
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from helpers.env import CONFIGS, requires_shared

DIFFUSERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
             "heun": HeunDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "ddim": DDIMScheduler,
             "ddpm": DDPMScheduler, "lcm": LCMScheduler}
NAMES = sorted(DIFFUSERS)
KARRAS = ("euler", "euler_a", "heun", "dpmpp_2m")
VP = ("dpmpp_2m", "ddim", "ddpm", "lcm")  # diffusers keeps their latents in VP space (init_noise_sigma 1)
SPACINGS = ("leading", "trailing", "linspace")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
LOOP_TOL = 1e-5
# diffusers' own `np.array(tensor)` calls warn under numpy 2; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def make(name: str, karras: bool = False, **cfg):
    """fewstep's SchedulerConfig and the matching diffusers scheduler, from the same settings.

    diffusers' EulerAncestralDiscreteScheduler has no Karras option: for euler_a + Karras its
    sigmas and timesteps are replaced by those of a Karras EulerDiscreteScheduler (same family)."""
    c = SchedulerConfig(**cfg)
    kw = dict(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
              beta_schedule=c.beta_schedule, prediction_type=c.prediction_type,
              timestep_spacing=c.timestep_spacing, steps_offset=c.steps_offset)
    if name in ("ddim", "ddpm"):
        kw["clip_sample"] = False  # diffusers' default is True; fewstep never clips (SD configs say false)
    if name in ("ddim", "lcm"):
        kw["set_alpha_to_one"] = c.set_alpha_to_one
    if name == "lcm":
        kw.update(original_inference_steps=c.original_inference_steps, timestep_scaling=c.timestep_scaling)
    if name == "dpmpp_2m":  # the defaults, stated: fewstep's dpmpp_2m is exactly this configuration
        kw.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                  euler_at_final=False, final_sigmas_type="zero")
    if karras and name != "euler_a":
        kw["use_karras_sigmas"] = True
    return c, DIFFUSERS[name](**kw)


def set_timesteps(name: str, d, n: int, karras: bool) -> None:
    d.set_timesteps(n)
    if name == "euler_a" and karras:
        kw = {k: d.config[k] for k in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing", "steps_offset")}
        e = EulerDiscreteScheduler(use_karras_sigmas=True, **kw)
        e.set_timesteps(n)
        d.sigmas, d.timesteps = e.sigmas.clone(), e.timesteps.clone()


def reference_schedule(name: str, d):
    """(timesteps [n], sigmas [n + 1], landing [n], init_sigma in VE space) read off diffusers."""
    ts = d.timesteps.double()
    if name in ("euler", "euler_a", "heun", "dpmpp_2m"):
        sig = d.sigmas.double()
        if name == "heun":  # Heun interleaves: t0, t1, t1, t2, t2, ... and s0, s1, s1, ..., 0
            ts, sig = torch.cat([ts[:1], ts[1::2]]), torch.cat([sig[:1], sig[1::2]])
    else:  # DDIM / DDPM / LCM keep no sigmas: sigma = sqrt((1 - a) / a) of their alphas_cumprod
        ac = d.alphas_cumprod.double()
        sig = torch.cat([((1 - ac[d.timesteps]) / ac[d.timesteps]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    landing = sig[1:]
    if name == "ddim":  # DDIM steps to t - T // n, below 0 to final_alpha_cumprod (its step())
        prev = d.timesteps - d.config.num_train_timesteps // d.num_inference_steps
        a = torch.where(prev >= 0, ac[prev.clamp(min=0)], d.final_alpha_cumprod.double())
        landing = ((1 - a) / a).sqrt()
        sig[-1] = landing[-1]
    init = float(d.init_noise_sigma) * (math.sqrt(sig[0].item() ** 2 + 1) if name in VP else 1.0)
    return ts, sig, landing, init


def schedule_cases():
    for name in NAMES:
        for karras in ((False, True) if name in KARRAS else (False,)):
            for spacing in SPACINGS:
                for n in (1, 2, 4, 25, 50):
                    for beta in BETAS:
                        yield name, karras, spacing, n, beta


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("name,karras,spacing,n,beta", list(schedule_cases()))
def test_schedule_matches_diffusers(name, karras, spacing, n, beta, offset):
    # Nothing here is rejected by diffusers: LCM ignores timestep_spacing / steps_offset (fewstep too),
    # and only LCM caps the step count (at original_inference_steps = 50).
    c, d = make(name, karras, beta_schedule=beta, timestep_spacing=spacing, steps_offset=offset,
                set_alpha_to_one=(offset == 0))
    set_timesteps(name, d, n, karras)
    ts, sig, landing, init = reference_schedule(name, d)
    s = schedules.schedule(samplers.SAMPLERS[name].family, c, n, karras)
    assert s.timesteps.shape == ts.shape and s.sigmas.shape == sig.shape
    torch.testing.assert_close(s.timesteps, ts, rtol=0, atol=1e-6)
    torch.testing.assert_close(s.sigmas, sig, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.landing, landing, rtol=1e-6, atol=1e-6)
    assert s.init_sigma == pytest.approx(init, rel=1e-6)


# ---- whole sampling loops -------------------------------------------------------------------------

W = torch.tensor([[0.9, 0.2, -0.1, 0.0], [-0.2, 0.8, 0.1, 0.1], [0.1, -0.1, 0.7, 0.2], [0.0, 0.3, -0.2, 0.9]])


def stand_in(sched: SchedulerConfig):
    """A fixed, smooth, nonlinear stand-in for the UNet. It guesses x0 as a bounded function of
    (x_in, t) and answers in the config's parameterisation (eps / v / x0) at alpha(t), so, as with
    a trained model, the latents stay O(1) at any noise level and 1e-5 is a meaningful tolerance."""
    ac = schedules.alphas_cumprod(sched).double()

    def model(x_in: torch.Tensor, t) -> torch.Tensor:
        t = float(t)
        lo = min(int(t), len(ac) - 2)
        a = (ac[lo] + (t - lo) * (ac[lo + 1] - ac[lo])).item()  # linear in t: Euler feeds fractional t
        mixed = torch.einsum("oc,bchw->bohw", W.to(x_in.dtype), x_in)
        x0 = 0.8 * torch.tanh(mixed) + 0.1 * torch.sin(3 * t / 1000 + x_in.roll(1, dims=-1))
        eps = (x_in - a ** 0.5 * x0) / (1 - a) ** 0.5
        return {"epsilon": eps, "v_prediction": a ** 0.5 * eps - (1 - a) ** 0.5 * x0, "sample": x0}[
            sched.prediction_type]
    return model


def recording(model, seen: list):
    def fn(x_in, t):
        seen.append(float(t))
        return model(x_in, t)
    return fn


def diffusers_loop(d, model, noise, n, seed, eta, seen):
    """The diffusers pipeline loop, with ancestral noise from a generator seeded like fewstep's."""
    g = torch.Generator().manual_seed(seed)
    extra = {"generator": g} if "generator" in inspect.signature(d.step).parameters else {}
    if isinstance(d, DDIMScheduler):
        extra["eta"] = eta
    x = noise * d.init_noise_sigma
    for t in d.timesteps:
        out = recording(model, seen)(d.scale_model_input(x, t), t)
        x = d.step(out, t, x, **extra).prev_sample
    return x


def compare_loops(name, n, karras=False, eta=0.0, seed=7, **cfg):
    c, d = make(name, karras, **cfg)
    set_timesteps(name, d, n, karras)
    dtype = torch.float32
    if name == "heun" and c.timestep_spacing == "linspace" and n > 1:
        # linspace ends at t = 0: Heun's last corrector evaluates at sigma(0) ~ 0.01-0.03 after a step
        # from ~14, multiplying rounding by ~500 (float32: up to 9e-5 off). Compare the algorithm in
        # float64 with diffusers' float32 sigmas upcast (then agreement is ~1e-13).
        dtype, d.sigmas = torch.float64, d.sigmas.double()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    seen_ref, seen = [], []
    model = stand_in(c)
    ref = diffusers_loop(d, model, noise, n, seed, eta, seen_ref)
    got = samplers.run(name, Denoiser(recording(model, seen), c), noise, c, n, karras=karras, eta=eta,
                       generator=torch.Generator().manual_seed(seed))
    assert seen == seen_ref  # the model is fed the timesteps diffusers feeds it
    assert got.dtype == ref.dtype and torch.isfinite(ref).all()
    err = (got - ref).abs().max().item()
    assert err <= LOOP_TOL, f"max |fewstep - diffusers| = {err:.3g}"


def loop_cases():
    for name in NAMES:
        for pred in ("epsilon", "v_prediction", "sample"):
            if name == "euler_a" and pred == "sample":
                continue  # diffusers' EulerAncestralDiscreteScheduler raises NotImplementedError for it
            for spacing in SPACINGS:
                for n in (1, 2, 4, 25):
                    yield name, pred, spacing, n


@pytest.mark.parametrize("name,pred,spacing,n", list(loop_cases()))
def test_loop_matches_diffusers(name, pred, spacing, n):
    compare_loops(name, n, prediction_type=pred, timestep_spacing=spacing, steps_offset=1)


@pytest.mark.parametrize("name", KARRAS)
@pytest.mark.parametrize("n", [1, 4, 25])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_karras_loop_matches_diffusers(name, n, pred):
    compare_loops(name, n, karras=True, prediction_type=pred, timestep_spacing="leading", steps_offset=1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beta,spacing", [("linear", "trailing"), ("linear", "linspace"),
                                          ("squaredcos_cap_v2", "leading")])
def test_loop_other_betas(name, beta, spacing):
    # squaredcos_cap_v2 only from leading spacing (t <= 751 at 4 steps) and not for LCM (always t = 999):
    # its sigma(999) = 2.03e4, where x0 = x - sigma * eps cancels ~5 digits, and diffusers' float32
    # sigmas alone move its own result by up to ~1e-3 (Heun: O(1); Euler ancestral: NaN from a
    # negative sigma_down^2). Those runs test float32 rounding, not the sampler.
    if beta == "squaredcos_cap_v2" and name == "lcm":
        pytest.skip("LCM always starts at t = 999: ill-conditioned under squaredcos_cap_v2 (see above)")
    compare_loops(name, 4, beta_schedule=beta, timestep_spacing=spacing, steps_offset=1,
                  beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing,n", [("leading", 4), ("linspace", 4), ("trailing", 3), ("linspace", 25)])
def test_ddim_eta_and_final_alpha(eta, alpha_to_one, spacing, n):
    # linspace / trailing-3 make DDIM land off the next timestep (t - T // n): the rescale must match
    compare_loops("ddim", n, eta=eta, set_alpha_to_one=alpha_to_one, timestep_spacing=spacing, steps_offset=1)


@pytest.mark.parametrize("original,n", [(50, 1), (50, 4), (50, 8), (4, 4)])
def test_lcm_original_steps(original, n):
    compare_loops("lcm", n, original_inference_steps=original, prediction_type="epsilon")


def shipped(model: str) -> dict:
    return json.loads((CONFIGS / model / "scheduler" / "scheduler_config.json").read_text())


@requires_shared
@pytest.mark.parametrize("model,name", [("sd-turbo", "euler"), ("sdxl-turbo", "euler_a"), ("sdxl-base", "euler")])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_turbo_configs(model, name, n):
    """SD-Turbo (Euler, trailing, steps_offset 1) and SDXL-Turbo (Euler ancestral, trailing) as shipped."""
    raw = shipped(model)
    c = SchedulerConfig.from_diffusers(raw)
    assert samplers.for_scheduler(c.class_name) == name
    d = DIFFUSERS[name].from_config(raw)
    d.set_timesteps(n)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = diffusers_loop(d, stand_in(c), noise, n, 3, 0.0, [])
    got = samplers.run(name, Denoiser(stand_in(c), c), noise, c, n, generator=torch.Generator().manual_seed(3))
    assert (got - ref).abs().max().item() <= LOOP_TOL
    if model == "sd-turbo" and n == 1:  # the one-step turbo schedule: t = 999, sigma_max -> 0
        s = schedules.schedule(samplers.SAMPLERS[name].family, c, n)
        assert s.timesteps.tolist() == [999.0] and s.sigmas[-1].item() == 0.0
        assert s.init_sigma == pytest.approx(14.6146, abs=1e-4)


# ---- pieces ---------------------------------------------------------------------------------------

def test_callback_sees_every_step_and_progress_runs():
    c = SchedulerConfig()
    calls = []
    noise = torch.randn(1, 4, 8, 8)
    samplers.run("heun", Denoiser(stand_in(c), c), noise, c, 3, progress=True,
                 callback=lambda i, x, den, sigma: calls.append((i, float(sigma))))
    sig = schedules.schedule("k", c, 3).sigmas
    assert calls == [(i, sig[i].item()) for i in range(3)]


def test_sigma_to_t_recovers_training_timesteps():
    c = SchedulerConfig()
    den = Denoiser(stand_in(c), c)
    train = schedules.training_sigmas(c)
    ts = [den.sigma_to_t(train[t].item()) for t in (0, 1, 250, 500, 998, 999)]
    assert ts == pytest.approx([0, 1, 250, 500, 998, 999], abs=1e-4)


def test_the_sampler_table_names_schedules_and_diffusers_classes():
    """Every sampler's row names a schedule family fewstep has and the diffusers scheduler it matches."""
    assert set(samplers.SAMPLERS) == set(DIFFUSERS)
    for name, spec in samplers.SAMPLERS.items():
        assert spec.family in schedules.FAMILIES and spec.diffusers == DIFFUSERS[name].__name__
        assert samplers.for_scheduler(spec.diffusers) == name
        assert spec.karras == (spec.family in schedules.KARRAS_FAMILIES)
    assert samplers.for_scheduler("PNDMScheduler") == "euler"


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="dpm++"), "unknown sampler 'dpm\\+\\+'; choose one of: ddim, ddpm, dpmpp_2m, euler"),
    (dict(steps=0), "steps=0 must be"),
    (dict(steps=-3), "steps=-3 must be"),
    (dict(steps=2.5), "steps=2.5 must be"),
    (dict(steps=1001), "more than the model's 1000"),
    (dict(name="lcm", steps=51), "at most original_inference_steps=50"),
    (dict(name="ddim", karras=True), "Karras sigmas apply to"),
])
def test_bad_input(kwargs, match):
    c = SchedulerConfig()
    args = dict(name="euler", steps=4, karras=None) | kwargs
    with pytest.raises(FewstepError, match=match) as e:
        samplers.run(args["name"], Denoiser(stand_in(c), c), torch.zeros(1, 4, 8, 8), c, args["steps"],
                     karras=args["karras"])
    assert "\n" not in str(e.value)
