"""Control maps of shapes scenes (layout silhouettes, canny edges) with exact pixel counts, the held-out
ControlNet cases and how they are judged: a render of the case's own scene is right, a moved object is not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fewstep.errors import FewstepError
from fewstep.shapes.control import (Case, colour_caption, control_map, figures, held_out, judge, training_batch)
from fewstep.shapes.evaluate import parse_image
from fewstep.shapes.render import Obj, Scene, render

SCENE = Scene((Obj("red", "square", "large", "on the right"), Obj("blue", "circle", "small", "at the top left")),
              "yellow")


def test_layout_is_white_silhouettes_on_black():
    m = control_map(SCENE, "layout")
    assert m.shape == (128, 128, 3) and m.dtype == np.uint8
    assert (m[..., 0] == m[..., 1]).all() and (m[..., 0] == m[..., 2]).all()  # no colour
    grey = m[..., 0]
    # the large square: 51.2 px a side -> 51 full columns / rows and anti-aliased fringes; the small circle
    assert (grey == 255).sum() == 2968 and (grey > 0).sum() == 3252 and (grey == 0).sum() == 13132
    assert grey[64, 96] == 255 and grey[32, 32] == 255 and grey[64, 10] == 0  # square centre, circle centre


def test_canny_is_the_scenes_edges():
    m = control_map(SCENE, "canny")[..., 0]
    assert set(np.unique(m)) == {0, 255} and (m == 255).sum() == 565
    assert m[64, 96] == 0 and m[32, 32] == 0  # interiors are not edges
    row = np.nonzero(m[64])[0]
    assert row.tolist() == [69, 70, 120, 121]  # the square spans 70.4 to 121.6 px: each side an edge pair


def test_unknown_condition_is_one_line():
    with pytest.raises(FewstepError, match="unknown control condition 'depth': use one of layout, canny"):
        control_map(SCENE, "depth")


def test_training_batch_is_seeded_and_mixes_caption_kinds():
    images, maps, texts = training_batch(5, 40, "layout")
    again = training_batch(5, 40, "layout")
    assert images.shape == maps.shape == (40, 128, 128, 3) and np.array_equal(maps, again[1]) and texts == again[2]
    kinds = [("" if not t else "colours" if not any(s in t for s in ("circle", "square", "triangle")) else "full")
             for t in texts]
    assert kinds.count("full") == 8 and kinds.count("colours") == 28 and kinds.count("") == 4  # of 0.3, 0.6, 0.1


def test_colour_captions_name_the_colours_in_reading_order():
    """The upper object first, then left to right: the colours say which silhouette is which."""
    assert colour_caption(SCENE) == "a blue and a red"  # the blue circle at the top left is above the red square
    row = Scene((Obj("red", "square", "small", "on the right"), Obj("orange", "circle", "small", "on the left")),
                "white")
    assert colour_caption(row) == "an orange and a red"
    assert colour_caption(Scene(SCENE.objects[:1], "yellow")) == "a red"


def test_held_out_cases_and_judge():
    cases = held_out(7_000_000, 20)
    assert sum(len(c.scene.objects) == 2 for c in cases) == 10
    assert [c.kind for c in cases[:4]] == ["full", "colours", "full", "colours"]
    assert cases[1].prompt == colour_caption(cases[1].scene) and " and " in colour_caption(SCENE)
    verdicts = [judge(c, *parse_image(render(c.scene))) for c in cases]
    assert all(v == {"layout": True, "size": True, "right": True} for v in verdicts)
    assert figures(cases, verdicts)["all"] == {"layout": 1.0, "size": 1.0, "right": 1.0, "n": 20}


def test_judge_counts_what_differs():
    case = Case(SCENE, "a red and a blue", "colours")
    moved = Scene((replace(SCENE.objects[0], position="at the bottom right"), SCENE.objects[1]), "yellow")
    recoloured = Scene((replace(SCENE.objects[0], color="green"), SCENE.objects[1]), "yellow")
    assert judge(case, *parse_image(render(moved))) == {"layout": False, "size": False, "right": False}
    assert judge(case, *parse_image(render(recoloured))) == {"layout": True, "size": True, "right": False}
    full = Case(SCENE, "a large red square on the right and a small blue circle at the top left", "full")
    swapped = Scene((replace(SCENE.objects[0], color="blue"), replace(SCENE.objects[1], color="red")), "yellow")
    assert judge(full, *parse_image(render(swapped)))["right"] is False
    assert judge(case, *parse_image(render(swapped)))["right"] is True  # colour-only: the set of colours
