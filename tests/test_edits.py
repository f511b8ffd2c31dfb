"""Image-to-image and inpainting give diffusers' images: the same seed (a CPU generator, batch of one) and
the same checkpoint, scheduler, steps, strength and guidance make the same pixels as diffusers'
StableDiffusion(XL)Img2Img / Inpaint pipelines, on tiny random SD 1.x, SD 2.x (v-prediction) and SDXL
pipelines, with 4- and 9-channel UNets, deterministic and stochastic samplers.

Tolerance: mean |difference| <= 1/255 and max <= 4/255 on uint8 images (the txt2img parity's)."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fewstep
from helpers.env import requires_shared

pytestmark = [requires_shared, pytest.mark.usefixtures("one_thread")]

PROMPT = "a red circle on the left and a small blue square"
SIZE = 64
SCHEDULERS = {"euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "ddim": diffusers.DDIMScheduler,
              "lcm": diffusers.LCMScheduler, "heun": diffusers.HeunDiscreteScheduler}
IMG2IMG = {"sdxl": diffusers.StableDiffusionXLImg2ImgPipeline}
INPAINT = {"sdxl": diffusers.StableDiffusionXLInpaintPipeline}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from helpers.tiny import make_pipeline
    root = tmp_path_factory.mktemp("edit-pipes")
    return {f: make_pipeline(f, root) for f in ("sd1", "sd2-v", "sdxl", "sd1-inpaint")}


def source(size: int = SIZE) -> Image.Image:
    """A picture with structure: a gradient, a disc and a bar."""
    y, x = np.mgrid[0:size, 0:size]
    a = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    image = Image.fromarray(a)
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 30, 30), fill=(250, 30, 30))
    draw.rectangle((36, 20, 58, 44), fill=(20, 40, 230))
    return image


def mask(size: int = SIZE) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((30, 10, 62, 50), fill=255)
    return m


def reference(cls, ref, sampler: str, folder):
    """diffusers' `cls` on the tiny pipeline's modules, with `sampler`'s scheduler on the config fewstep reads
    (the saved file: every value explicit, so no scheduler class swaps in its own defaults)."""
    pipe = cls(**{k: v for k, v in ref.components.items() if k in cls._get_signature_keys(cls)[0] or k in
                  ("scheduler", "unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    pipe.scheduler = SCHEDULERS[sampler].from_pretrained(folder / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs):
    a, b = np.asarray(ours[0], dtype=np.int16), np.round(theirs[0] * 255).astype(np.int16)
    diff = np.abs(a - b)
    assert a.shape == b.shape and b.std() > 5
    assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    return a


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
@pytest.mark.parametrize("sampler,steps,strength,guidance", [
    ("euler", 4, 0.6, 0.0), ("euler_a", 5, 0.7, 5.0), ("dpmpp_2m", 6, 0.5, 0.0), ("ddim", 4, 0.75, 5.0),
    ("lcm", 4, 0.5, 0.0), ("heun", 3, 0.7, 0.0), ("euler", 3, 1.0, 0.0),
])
def test_image_to_image_is_diffusers(pipelines, family, sampler, steps, strength, guidance):
    folder, ref = pipelines[family]
    cls = IMG2IMG.get(family, diffusers.StableDiffusionImg2ImgPipeline)
    theirs = reference(cls, ref, sampler, folder)(PROMPT, image=source(), strength=strength, num_inference_steps=steps,
                                          guidance_scale=guidance, output_type="np",
                                          generator=torch.Generator().manual_seed(11)).images
    ours = fewstep.load(folder)(PROMPT, image=source(), strength=strength, steps=steps, guidance=guidance,
                                sampler=sampler, seed=11, progress=False)
    compare(ours, theirs)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd1-inpaint"])
@pytest.mark.parametrize("sampler,steps,strength,guidance", [
    ("euler", 4, 1.0, 0.0), ("euler_a", 4, 1.0, 5.0), ("euler", 5, 0.6, 5.0), ("dpmpp_2m", 4, 0.75, 0.0),
    ("lcm", 4, 1.0, 0.0), ("ddim", 4, 0.8, 0.0),
])
def test_inpainting_is_diffusers(pipelines, family, sampler, steps, strength, guidance):
    folder, ref = pipelines[family]
    cls = INPAINT.get(family, diffusers.StableDiffusionInpaintPipeline)
    theirs = reference(cls, ref, sampler, folder)(PROMPT, image=source(), mask_image=mask(), strength=strength,
                                          num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                                          height=SIZE, width=SIZE,
                                          generator=torch.Generator().manual_seed(5)).images
    ours = fewstep.load(folder)(PROMPT, image=source(), mask_image=mask(), strength=strength, steps=steps,
                                guidance=guidance, sampler=sampler, seed=5, progress=False)
    compare(ours, theirs)
