"""SDXL's refiner: its folder (one text encoder, an aesthetic score in the time ids) loads and runs as
diffusers' StableDiffusionXLImg2ImgPipeline does, and a base stopped at `denoising_end` hands its latents
to the refiner started at `denoising_start`, as diffusers' base + refiner recipe does: the same latents
at the hand-off and the same image at the end (same seeds, batch of one; tiny random models).

Tolerance: the txt2img parity's, mean |difference| <= 1/255, max <= 4/255; latents to 1e-4."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from helpers.env import requires_shared

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle on the left and a small blue square"
SCHEDULERS = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("refiner")
    return make_pipeline("sdxl", root), make_pipeline("sdxl-refiner", root)


def with_scheduler(pipe, folder, sampler):
    pipe.scheduler = SCHEDULERS[sampler].from_pretrained(folder / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(ours, theirs):
    a, b = np.asarray(ours, dtype=np.int16), np.round(theirs * 255).astype(np.int16)
    diff = np.abs(a - b)
    assert b.std() > 5 and diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())


def test_the_refiner_folder_loads_as_data(pair):
    (_, _), (folder, _) = pair
    refiner = fewstep.load(folder)
    assert len(refiner.text_encoders) == 1 and refiner.text_encoders[0].cfg.projection_dim == 32
    c = refiner.conditioning
    assert (c.hidden_state, c.pooled, c.time_ids, c.aesthetic_score, c.zeros_for_empty_negative) == (
        "penultimate", True, True, True, False)


@pytest.mark.parametrize("guidance,scores", [(0.0, (6.0, 2.5)), (5.0, (7.0, 1.0))])
def test_the_refiner_redraws_an_image_as_diffusers(pair, guidance, scores):
    (_, _), (folder, ref) = pair
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    theirs = with_scheduler(ref, folder, "euler")(PROMPT, image=image, strength=0.6, num_inference_steps=5,
                                                  guidance_scale=guidance, aesthetic_score=scores[0],
                                                  negative_aesthetic_score=scores[1], output_type="np",
                                                  generator=torch.Generator().manual_seed(2)).images[0]
    ours = fewstep.load(folder)(PROMPT, image=image, strength=0.6, steps=5, guidance=guidance, sampler="euler",
                                aesthetic_score=scores[0], negative_aesthetic_score=scores[1], seed=2,
                                progress=False)[0]
    close(ours, theirs)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_base_hands_over_to_the_refiner_as_diffusers(pair, sampler):
    (base_folder, base_ref), (folder, ref) = pair
    kw = dict(num_inference_steps=10, guidance_scale=5.0, height=64, width=64)
    their_latents = with_scheduler(base_ref, base_folder, sampler)(
        PROMPT, denoising_end=0.7, output_type="latent", generator=torch.Generator().manual_seed(3), **kw).images
    theirs = with_scheduler(ref, folder, sampler)(
        PROMPT, image=their_latents, denoising_start=0.7, num_inference_steps=10, guidance_scale=5.0,
        output_type="np", generator=torch.Generator().manual_seed(4)).images[0]
    base, refiner = fewstep.load(base_folder), fewstep.load(folder)
    latents = base(PROMPT, denoising_end=0.7, output_type="latent", steps=10, guidance=5.0, sampler=sampler,
                   width=64, height=64, seed=3, progress=False)
    assert (latents - their_latents).abs().max() <= 1e-4 * their_latents.abs().max()
    ours = refiner(PROMPT, image=latents, denoising_start=0.7, steps=10, guidance=5.0, sampler=sampler, seed=4,
                   progress=False)[0]
    close(ours, theirs)
    mixed = refiner(PROMPT, image=their_latents, denoising_start=0.7, steps=10, guidance=5.0, sampler=sampler,
                    seed=4, progress=False)[0]  # diffusers' base latents into fewstep's refiner
    close(mixed, theirs)


def test_hand_off_mistakes_are_one_line(pair):
    (_, _), (folder, _) = pair
    refiner = fewstep.load(folder)
    for kwargs, match in ((dict(denoising_start=0.7), "continues from latents"),
                          (dict(denoising_start=1.5, image=torch.zeros(1, 4, 8, 8)), "between 0 and 1"),
                          (dict(denoising_start=0.7, denoising_end=0.5, image=torch.zeros(1, 4, 8, 8)), "must come after"),
                          (dict(denoising_end=0.0), "between 0 and 1")):
        with pytest.raises(fewstep.FewstepError, match=match):
            refiner(PROMPT, progress=False, **kwargs)
