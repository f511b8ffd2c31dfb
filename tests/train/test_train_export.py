"""The export stage: the exported folders against diffusers, and the closing scores of `train all`.

Parity tolerance for exported folders (as for every pipeline): mean abs <= 1/255, max <= 4/255.
"""

import shutil

import numpy as np
import pytest
import torch

import fewstep
from helpers.train import PROMPTS


def test_export_scores_the_student_at_one_step_and_four(run, tmp_path, monkeypatch):
    """The closing check of `train all` (full size only): the teacher at its own defaults, the student at 1 step as
    `student` and at 4 as `student_4_steps` (its own default is 4, which once made both rows 4-step rows)."""
    from fewstep.train import recipe
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    calls = []
    monkeypatch.setattr(recipe, "evaluate", lambda pipe, n, **kw: calls.append(
        (pipe.defaults.steps, kw.get("steps", pipe.defaults.steps))) or {"steps": calls[-1][1]})
    report = recipe.export_and_score(out, tiny=False, n=2)
    assert calls == [(25, 25), (4, 1), (4, 4)]
    assert (report["teacher"], report["student"], report["student_4_steps"]) == ({"steps": 25}, {"steps": 1},
                                                                                 {"steps": 4})


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.int16)


@pytest.mark.parametrize("name,steps,guidance", [("shapes-turbo", 1, 0.0), ("shapes-turbo", 4, 0.0),
                                                 ("shapes-teacher", 3, 5.0)])
def test_export_matches_diffusers(run, name, steps, guidance):
    from diffusers import StableDiffusionPipeline
    folder = run[0] / name
    ref = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    pipe = fewstep.load(folder)
    size = pipe.unet.cfg.sample_size * 8
    latents = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(7))
    theirs = ref(PROMPTS[:2], num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                 height=size, width=size, output_type="np").images
    ours = pipe(PROMPTS[:2], steps=steps, guidance=guidance, latents=latents, sampler="euler", progress=False,
                output_type="pt")  # the folders' scheduler is diffusers' Euler; fewstep.json picks another sampler
    a, b = _uint8((ours / 2 + 0.5).permute(0, 2, 3, 1).numpy()), _uint8(theirs)
    assert b.std() > 5, "reference image is flat: the test could not tell pipelines apart"
    diff = np.abs(a - b)
    assert diff.mean() <= 1.0 and diff.max() <= 4, (diff.mean(), diff.max())
    assert (pipe.defaults.steps, pipe.defaults.sampler) == ((4, "lcm") if name == "shapes-turbo" else (25, "euler_a"))
