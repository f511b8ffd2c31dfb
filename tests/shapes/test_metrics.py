"""The evaluation harness: Fréchet distance against closed forms, accuracy wiring on fake pipelines."""

import numpy as np
import torch

from fewstep.shapes.metrics import evaluate, frechet_distance, markdown
from fewstep.shapes.data import batch


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0], dtype=torch.float64)
    assert abs(frechet_distance(a, a + shift) - 5.0) < 1e-9  # same covariance: only ||mu_a - mu_b||^2
    scale = torch.tensor([1.0, 2, 3, 1, 1, 1], dtype=torch.float64)
    # Covariances S and diag(scale) S diag(scale) of (almost) white data: sum (1 - scale)^2 * var.
    b = a * scale
    var = torch.var(a, dim=0)
    expected = float(((scale - 1) ** 2 * var).sum() + (a.mean(0) - b.mean(0)).square().sum())
    assert abs(frechet_distance(a, b) - expected) < 0.05 * expected


class FakePipe:
    """Returns the renderer's own image for each caption (a perfect model), or a rotation of them."""

    def __init__(self, images, captions, rotate=0):
        self.lookup = {c: im for c, im in zip(captions, images)}
        self.rotate = rotate

    def __call__(self, prompts, steps, seed, progress, output_type):
        ims = [self.lookup[p] for p in prompts]
        ims = ims[self.rotate:] + ims[:self.rotate]
        return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_evaluate_scores_a_perfect_and_a_wrong_model():
    images, captions, _ = batch(5, 60, drop=0.0)
    captions = list(dict.fromkeys(captions))  # unique captions only
    images = images[:len(captions)]
    good, out = evaluate(FakePipe(images, captions), captions, steps=1, batch=7)
    assert (good.one, good.two) == (1.0, 1.0) and good.n_one + good.n_two == len(captions)
    assert (out == images).all()
    bad, _ = evaluate(FakePipe(images, captions, rotate=1), captions, steps=1, batch=7)
    assert bad.one < 0.3 and bad.two < 0.3
    assert "| m | 1 | 100.0%" in markdown([good], "m")


def test_why_line_counts_every_wrong_image():
    from fewstep.scoring.cli import why_line
    images, captions, _ = batch(5, 40, drop=0.0)
    assert why_line(4, captions, images) == "4 steps, wrong: 1-object: none; 2-object: none"
    line = why_line(1, captions, np.roll(images, 1, axis=0))  # every image shows the next prompt's scene
    one, two = line.removeprefix("1 steps, wrong: ").split("; ")
    counts = [int(part.rsplit(" ", 1)[1]) for part in (one.split(": ", 1)[1] + ", " + two.split(": ", 1)[1]).split(", ")]
    assert one.startswith("1-object: ") and two.startswith("2-object: ")
    from fewstep.shapes.evaluate import score
    wrong = sum(not score(c, im) for c, im in zip(captions, np.roll(images, 1, axis=0)))
    assert sum(counts) == wrong >= 35  # each wrong image counted once; few shifted scenes fit their prompt
