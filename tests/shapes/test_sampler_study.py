"""scripts/measure/sampler_study.py on the shipped models: exact UNet-evaluation counts per sampler (Heun's two
evaluations a step but none after the last, guidance's two halves in one call), the same images as
`fewstep eval` for the same sampler, the plot, and one-line errors for a bad --runs."""

import importlib.util

import numpy as np
import pytest
import torch

import fewstep
from fewstep.shapes.metrics import generate
from fewstep.loading.hub import ASSETS
from helpers.env import ROOT

spec = importlib.util.spec_from_file_location("sampler_study", ROOT / "scripts" / "measure" / "sampler_study.py")
sampler_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sampler_study)
PROMPTS = ["a small red circle on the left", "a large blue square and a small yellow triangle"]


@pytest.mark.parametrize("folder,runs,expected", [
    ("shapes-turbo", [("euler", 1), ("euler", 4), ("heun", 3), ("dpmpp_2m", 4), ("lcm", 2)], [1, 4, 5, 4, 2]),
    ("shapes-teacher", [("euler", 3), ("heun", 2)], [3, 3]),  # guidance 5: cond and uncond in one call
])
def test_unet_evaluations_are_counted_exactly(folder, runs, expected):
    pipe = fewstep.load(ASSETS / folder)
    with torch.inference_mode():
        rows = sampler_study.study(pipe, runs, PROMPTS, batch=1)
    assert [r[2] for r in rows] == expected
    assert [(r[0], r[1]) for r in rows] == runs
    assert all(r[3].n_one == 1 and r[3].n_two == 1 for r in rows)
    assert not pipe.unet._forward_pre_hooks  # the counting hook is removed


def test_same_images_as_eval_and_a_plot(tmp_path, monkeypatch):
    pipe = fewstep.load()
    seen = []  # the images study() scores, caught where evaluate() makes them
    import fewstep.shapes.metrics as ev
    original = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    with torch.inference_mode():
        rows = sampler_study.study(pipe, [("euler_a", 2)], PROMPTS, seed=3, batch=2)
        direct = generate(pipe, PROMPTS, 3, 2, steps=2, sampler="euler_a")
    np.testing.assert_array_equal(seen[0], direct)
    sampler_study.plot(rows + [("euler", 1, 1.0, rows[0][3])], "test", tmp_path / "p.png")
    from PIL import Image
    assert Image.open(tmp_path / "p.png").size[0] > 300


@pytest.mark.parametrize("text,message", [("nosuch:4", "unknown sampler 'nosuch'"), ("euler:four", "SAMPLER:STEPS"),
                                          ("", "names no sampler")])
def test_bad_runs_is_one_line(text, message):
    with pytest.raises(SystemExit, match=message):
        sampler_study.parse_runs(text)
