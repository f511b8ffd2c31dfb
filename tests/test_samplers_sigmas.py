"""The sigma schedules beside the model's own spacing (`run(sigma_schedule=...)`).

Karras and exponential sigmas are diffusers' use_karras_sigmas / use_exponential_sigmas and are checked
against every scheduler that has them in test_samplers.py. SGM Uniform and Align Your Steps are not
diffusers options: their values are checked against the reference implementations' (ComfyUI's
normal_scheduler(sgm=True) and AlignYourStepsScheduler, run on SD's noise schedule, and NVIDIA's published
10-step lists), and sampling on them against diffusers' EulerDiscreteScheduler given the same sigmas.
"""

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from test_samplers import KARRAS, LOOP_TOL, diffusers_loop, recording, stand_in

from fewstep import samplers, schedules
from fewstep.configs import SchedulerConfig
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers' own
              pytest.mark.usefixtures("one_thread")]
SD = SchedulerConfig(timestep_spacing="leading", steps_offset=1)  # SD 1.x / SDXL: scaled_linear 0.00085 .. 0.012

# NVIDIA's Align Your Steps 10-step schedules (research.nvidia.com/labs/toronto-ai/AlignYourSteps, the
# how-to page; diffusers' AysSchedules): the timesteps, and the sigmas to 3 decimals. fewstep follows
# ComfyUI, whose 10-step sigmas are the model's sigmas at exactly those timesteps; the 3-decimal list
# (A1111's) differs from them by up to 1.4% (SDXL's 0.113 against sigma(13) = 0.1114).
AYS_PUBLISHED = {
    "sd15": ([999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
             [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]),
    "sdxl": ([999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
             [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0]),
}
# ComfyUI's AlignYourStepsScheduler (comfy_extras/nodes_align_your_steps.py: loglinear_interp to steps + 1
# points, the last set to 0), its output to 7 digits.
AYS_COMFY = {
    ("sd15", 4): [14.61464, 3.226626, 1.394381, 0.5093886, 0.0],
    ("sdxl", 4): [14.61464, 2.866872, 0.8620721, 0.2976505, 0.0],
    ("sd15", 20): [14.61464, 9.727467, 6.474576, 5.001565, 3.863675, 3.226626, 2.694615, 2.253258, 1.884192,
                   1.620889, 1.394381, 1.159544, 0.9642584, 0.7931279, 0.6523686, 0.5093886, 0.3977456,
                   0.2454948, 0.1515233, 0.06647934, 0.0],
}
# ComfyUI's normal_scheduler(sgm=True) on SD's ModelSamplingDiscrete (float64 betas, float32 log sigmas,
# log-linear sigma(t)): timesteps linspace(999, 0, n + 1)[:-1], to 7 digits.
SGM_COMFY = {
    4: [14.61464, 4.086081, 1.61558, 0.6951495, 0.0],
    8: [14.61464, 7.301982, 4.086081, 2.495967, 1.61558, 1.071159, 0.6951495, 0.3997014, 0.0],
}


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_ays_ten_steps_are_nvidias_published_schedule(model):
    timesteps, sigmas = AYS_PUBLISHED[model]
    s = schedules.schedule("k", SD, 10, sigma_schedule="ays", ays_model=model)
    torch.testing.assert_close(s.timesteps, torch.tensor(timesteps, dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(s.sigmas, torch.tensor(sigmas, dtype=torch.float64), rtol=0.015, atol=0)


@pytest.mark.parametrize("model,n", list(AYS_COMFY))
def test_ays_other_step_counts_interpolate_as_comfyui(model, n):
    s = schedules.schedule("k", SD, n, sigma_schedule="ays", ays_model=model)
    torch.testing.assert_close(s.sigmas, torch.tensor(AYS_COMFY[model, n], dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", list(SGM_COMFY))
def test_sgm_uniform_is_comfyuis(n):
    # 2e-6: ComfyUI builds the betas in float64, diffusers (and fewstep) in float32
    s = schedules.schedule("k", SD, n, sigma_schedule="sgm_uniform")
    torch.testing.assert_close(s.sigmas, torch.tensor(SGM_COMFY[n], dtype=torch.float64), rtol=2e-6, atol=0)
    torch.testing.assert_close(s.timesteps, torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1], rtol=0,
                               atol=1e-3)


@pytest.mark.parametrize("kind", ["ays", "sgm_uniform"])
@pytest.mark.parametrize("spacing,n", [("leading", 10), ("trailing", 4), ("linspace", 7)])
def test_euler_on_them_is_diffusers_given_the_same_sigmas(kind, spacing, n):
    """diffusers takes any sigmas: EulerDiscreteScheduler.set_timesteps(sigmas=...) gives the same
    timesteps, initial noise and latents."""
    c = SchedulerConfig(timestep_spacing=spacing, steps_offset=1, prediction_type="v_prediction")
    s = schedules.schedule("k", c, n, sigma_schedule=kind)
    d = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               timestep_spacing=spacing, steps_offset=1, prediction_type="v_prediction")
    d.set_timesteps(sigmas=s.sigmas.tolist())
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen_ref, seen = [], []
    ref = diffusers_loop(d, stand_in(c), noise, n, 0, 0.0, seen_ref)
    got = samplers.run("euler", Denoiser(recording(stand_in(c), seen), c), noise, c, n, sigma_schedule=kind)
    assert seen == seen_ref and (got - ref).abs().max().item() <= LOOP_TOL


@pytest.mark.parametrize("name", KARRAS)
def test_every_sampler_with_free_sigmas_walks_them(name):
    """Each sigma schedule is one list of sigmas, whatever the sampler's family; the model is fed t =
    sigma_to_t(sigma) (for AYS and SGM Uniform: the fractional t, in every family)."""
    c = SchedulerConfig(timestep_spacing="trailing", steps_offset=1)
    family = samplers.SAMPLERS[name].family
    for kind in ("karras", "exponential", "sgm_uniform", "ays"):
        s = schedules.schedule(family, c, 6, sigma_schedule=kind)
        if kind in ("sgm_uniform", "ays"):
            assert torch.equal(s.sigmas, schedules.schedule("k", c, 6, sigma_schedule=kind).sigmas)
        seen = []
        x = samplers.run(name, Denoiser(recording(stand_in(c), seen), c), torch.randn(1, 4, 8, 8), c, 6,
                         sigma_schedule=kind, generator=torch.Generator().manual_seed(0))
        fed = s.timesteps.float().tolist()  # the UNet embeds t in float32
        assert torch.isfinite(x).all() and seen[0] == fed[0] and set(fed) <= set(seen)


def test_karras_true_is_sigma_schedule_karras_and_the_config_yields_to_a_schedule():
    c = SchedulerConfig(use_karras_sigmas=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    den = Denoiser(stand_in(c), c)
    by_config = samplers.run("dpmpp_2m", den, noise, c, 5)
    assert torch.equal(by_config, samplers.run("dpmpp_2m", den, noise, c, 5, karras=True))
    assert torch.equal(by_config, samplers.run("dpmpp_2m", den, noise, c, 5, sigma_schedule="karras"))
    exponential = samplers.run("dpmpp_2m", den, noise, c, 5, sigma_schedule="exponential")
    assert not torch.equal(by_config, exponential)  # an explicit schedule wins over use_karras_sigmas
    assert torch.equal(samplers.run("plms", den, noise, c, 5), samplers.run("plms", den, noise, c, 5, karras=None))


def test_cut_reads_the_sigma_schedule():
    # denoising_end = 0.16 cuts at t = 840: AYS's 10 steps keep 999 and 850, leading spacing only 901
    assert samplers.cut("euler", SD, 10, None, None, 0.16, sigma_schedule="ays") == (0, 2)
    assert samplers.cut("euler", SD, 10, None, None, 0.16) == (0, 1)
    assert samplers.cut("ddim", SD, 10, None, None, 0.16, sigma_schedule="ays") == (0, 1)  # not for ddim: ignored


def test_a_sigma_schedule_on_an_integer_timestep_family_is_refused():
    with pytest.raises(FewstepError, match="the ays sigma schedule does not apply to the pndm schedule") as e:
        schedules.schedule("pndm", SD, 4, sigma_schedule="ays")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("choice,name", [("ays", "Align Your Steps"), ("sgm_uniform", "SGM Uniform")])
def test_sigma_schedule_from_the_command_line(tmp_path, choice, name):
    """--sigma-schedule reaches the sampler (the image changes) and the parameters name it as A1111 does."""
    from PIL import Image

    from fewstep.cli import main
    from fewstep.outputs import read_parameters
    args = ["generate", "a red circle", "--sampler", "euler", "--steps", "3", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--sigma-schedule", choice, "--output", str(tmp_path / "s.png")]) == 0
    assert f"Schedule type: {name}" in read_parameters(tmp_path / "s.png")
    assert "Schedule type" not in read_parameters(tmp_path / "plain.png")
    a, b = (torch.tensor(list(Image.open(tmp_path / f).getdata())) for f in ("plain.png", "s.png"))
    assert (a - b).abs().max() > 0
