"""Control-image preprocessors: Canny through OpenCV on a known drawing (edges exactly on the square's border),
invert, the module recorded in the generation's parameters, one-line errors."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fewstep.errors import FewstepError
from fewstep.preprocess import canny, invert, preprocess


def square() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 90))
    ImageDraw.Draw(image).rectangle((16, 20, 47, 43), fill=(220, 200, 40))  # x 16..47, y 20..43
    return image


def test_canny_finds_the_squares_border_and_nothing_else():
    edges = np.asarray(canny(square()))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] == 255
    assert (edges[..., 0] == edges[..., 2]).all()
    ys, xs = np.nonzero(on)
    border = ((np.abs(xs - 16) <= 1) | (np.abs(xs - 47) <= 1)) & (ys >= 19) & (ys <= 44) | \
             ((np.abs(ys - 20) <= 1) | (np.abs(ys - 43) <= 1)) & (xs >= 15) & (xs <= 48)
    assert border.all()  # every edge pixel lies on the border (within a pixel)
    for x in range(18, 46):  # and the border is closed: each column crosses the top and bottom edges
        assert on[19:22, x].any() and on[42:45, x].any()
    for y in range(22, 42):
        assert on[y, 15:18].any() and on[y, 46:49].any()
    assert not canny(square(), 100, 200).getbbox() is None
    assert canny(Image.new("RGB", (32, 32), "white")).getbbox() is None  # a flat image has no edges


def test_invert_and_the_recorded_module():
    drawing = Image.new("RGB", (8, 8), "white")
    drawing.putpixel((3, 3), (0, 0, 0))
    out = preprocess("invert", drawing)
    assert np.asarray(out)[3, 3].tolist() == [255, 255, 255] and np.asarray(out)[0, 0].tolist() == [0, 0, 0]
    assert out.info["control_module"] == "invert" and preprocess("canny", square()).info["control_module"] == "canny"
    assert np.array_equal(np.asarray(invert(invert(square()))), np.asarray(square()))


def test_mistakes_are_one_line_errors():
    with pytest.raises(FewstepError, match="unknown control preprocessor 'depth'; choose one of: none, canny, invert"):
        preprocess("depth", square())
    with pytest.raises(FewstepError, match="canny thresholds 200, 100: give 0 <= low <= high"):
        canny(square(), 200, 100)
