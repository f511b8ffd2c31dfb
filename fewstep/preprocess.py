"""Control-image preprocessors: a photo turned into the map a ControlNet was trained on.

sd-webui-controlnet calls these "modules" and records the one used in the PNG parameters; fewstep has the
ones a well-kept library does without a network: Canny edges through OpenCV (`cv2.Canny` on the greyscale
image, the thresholds sd-webui-controlnet defaults to, 100 and 200) and the inversion of a drawing in black
lines on white (the extension's "invert"). The neural annotators (depth, pose, lineart, HED) come from
`controlnet_aux`, which requires torchvision, which this project does not install: make those maps with
it elsewhere and pass them as control images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .errors import FewstepError

PREPROCESSORS = ("none", "canny", "invert")
INSTALL = "the canny preprocessor needs OpenCV: pip install 'fewstep[control]' (opencv-python-headless)"


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White edges on black (RGB) of `image`: OpenCV's Canny with hysteresis thresholds `low` and `high`."""
    try:
        import cv2  # lazy: optional (pip install 'fewstep[control]')
    except ModuleNotFoundError:
        raise FewstepError(INSTALL) from None
    if not 0 <= low <= high:
        raise FewstepError(f"canny thresholds {low}, {high}: give 0 <= low <= high")
    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)  # [H, W] uint8, 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def invert(image: Image.Image) -> Image.Image:
    """A drawing in dark lines on white as white lines on black, as scribble and lineart ControlNets expect."""
    return ImageOps.invert(image.convert("RGB"))


def preprocess(name: str, image: Image.Image) -> Image.Image:
    """`image` through the preprocessor called `name` (sd-webui-controlnet's module name), which the image
    keeps in `info["control_module"]` for the generation's parameters text."""
    if name not in PREPROCESSORS:
        raise FewstepError(f"unknown control preprocessor {name!r}; choose one of: {', '.join(PREPROCESSORS)}")
    out = {"none": lambda im: im.convert("RGB"), "canny": canny, "invert": invert}[name](image)
    out.info["control_module"] = name
    return out
