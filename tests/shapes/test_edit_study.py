"""`fewstep eval --edits` on the built-in model: the cases are what they say, the scorer can fail, and
the shipped student edits as docs/editing.md reports (floors a little under its 200-case figures)."""

import numpy as np
import pytest

import fewstep
from fewstep.shapes import edits as study
from fewstep.shapes.evaluate import parse_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cases_are_what_they_say():
    for case in study.recolour_cases(0, 20):
        (found,), _ = parse_image(case.source)
        assert (found.shape, found.position) == (case.want.shape, case.want.position) and found.color != case.want.color
    for case in study.replace_cases(1, 20):
        assert case.mask.mean() == 127.5 and case.keep.position != case.want.position
        assert study.score_replace(case, case.source)[:2] == (False, 0.0)  # the source has the old object there


def test_the_student_edits_as_documented():
    figures, made, painted = study.run(fewstep.load(), n=20, seed=0)
    assert figures["layout_kept"] >= 0.9 and figures["new_colour"] >= 0.9 and figures["new_object"] >= 0.85
    assert figures["outside_max_diff"] == 0  # overlay: the original, exactly
    unchanged, _, _ = study.run(fewstep.load(), n=20, seed=0, strength=0.1)  # no step runs: nothing recoloured
    assert unchanged["new_colour"] == 0 and unchanged["layout_kept"] == 1
    assert study.grid(made, painted, rows=2).size == (5 * 180, np.asarray(study.grid(made, painted, 2)).shape[0])
