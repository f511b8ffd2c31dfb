"""Read an image back into objects (colour, shape, size, position) and score a prompt against it:
the compositional accuracy metric of fewstep's built-in synthetic-scene model.

Built to judge imperfect generated images, not only exact renders: each pixel takes the nearest
palette colour (or 'unknown' when far from all), the background is the commonest colour on the
border, and every other colour is split into connected components after a 3x3 morphological
opening, which removes anti-aliasing fringes (a red edge on yellow blends to orange) and speckle.
Each component is compared with the ideal shapes (circle, square, upright triangle, and the flat 2:1
rectangle the shipped models never learned) of its own area and centroid; the best intersection over
union names the shape (a component that fits none well is a 'blob', which no prompt accepts), and that
ideal shape's side and bounding-box centre give the size and the nearest of the nine positions.
Everything is numpy: no scipy.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from ..errors import FewstepError
from .caption import Prompt, Wanted, parse_prompt
from .render import COLORS, POSITIONS, SIZES

NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in NAMES], np.float32)  # [8, 3]
_ANCHORS = np.array(list(POSITIONS.values()), np.float32)  # [9, 2]
# The closest two palette colours (orange, yellow) are 81 apart; farther than 70 from all is unknown.
UNKNOWN_DISTANCE = 70.0
# The smallest object, a small triangle, covers 2% of the image; components under 0.6% are noise.
MIN_AREA = 0.006
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2  # fitted side / image side: small below, large above
MIN_SHAPE_IOU = 0.75  # renders fit their own shape at > 0.95 (> 0.9 blurred); a 3:2 ellipse fits none


@dataclass(frozen=True)
class Found:
    color: str
    shape: str  # circle, square, triangle, or 'blob' when no ideal shape fits
    size: str
    position: str
    area: float  # fraction of the image's pixels


def as_image(image) -> np.ndarray:
    """A uint8 [H, W, 3] array from a uint8 array, or a float one in [0, 1] (numpy or CPU torch)."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise FewstepError(f"an image must be [height, width, 3] RGB, not shape {list(array.shape)}")
    if array.dtype != np.uint8:
        array = np.round(np.clip(array.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    return array


def classify(image: np.ndarray) -> np.ndarray:
    """[H, W] index into NAMES of each pixel's nearest palette colour, -1 where none is near."""
    pixels = as_image(image).astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, as one matmul: much faster than [H, W, 8, 3] differences.
    distance = (pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ _PALETTE.T + (_PALETTE ** 2).sum(-1)  # [H, W, 8]
    nearest = distance.argmin(-1)
    closest = np.take_along_axis(distance, nearest[..., None], -1)[..., 0]
    return np.where(closest <= UNKNOWN_DISTANCE ** 2, nearest, -1)


def _opening(classes: np.ndarray) -> np.ndarray:
    """Keep a pixel only where some 3x3 window holding it is all of its class; others become -1."""
    h, w = classes.shape
    padded = np.pad(classes, 1, constant_values=-2)
    core = classes >= 0
    for dy, dx in itertools.product(range(3), range(3)):
        core &= padded[dy:dy + h, dx:dx + w] == classes
    padded_core = np.pad(core, 1)
    keep = np.zeros_like(core)
    for dy, dx in itertools.product(range(3), range(3)):
        keep |= padded_core[dy:dy + h, dx:dx + w]
    return np.where(keep, classes, -1)


def label(classes: np.ndarray) -> np.ndarray:
    """Connected components (4-neighbour) of equal non-negative classes: each pixel gets the flat
    index of its component's first pixel, and pixels with a negative class get H * W."""
    h, w = classes.shape
    valid = classes >= 0
    labels = np.where(valid, np.arange(h * w, dtype=np.int32).reshape(h, w), np.int32(h * w))
    across = (classes[:, 1:] == classes[:, :-1]) & valid[:, 1:]
    down = (classes[1:] == classes[:-1]) & valid[1:]
    flat_valid = valid.ravel()
    while True:
        new = labels.copy()
        pair = np.minimum(labels[:, 1:], labels[:, :-1])
        new[:, 1:] = np.where(across, np.minimum(new[:, 1:], pair), new[:, 1:])
        new[:, :-1] = np.where(across, np.minimum(new[:, :-1], pair), new[:, :-1])
        pair = np.minimum(labels[1:], labels[:-1])
        new[1:] = np.where(down, np.minimum(new[1:], pair), new[1:])
        new[:-1] = np.where(down, np.minimum(new[:-1], pair), new[:-1])
        # Pointer jumping: a label is a pixel of the same component, so its label is one too;
        # this ends the loop in a handful of passes rather than one per pixel of diameter.
        flat = new.ravel()
        flat[flat_valid] = flat[flat[flat_valid]]
        if np.array_equal(new, labels):
            return new
        labels = new


def fit_shapes(mask: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
    """For each ideal shape (circle, square, upright triangle, flat 2:1 rectangle) of the mask's area and
    centroid: (IoU with the mask, side, bounding-box centre x, y), in pixels. Fitting by area and centroid,
    not by bounding box, keeps a fit good when blur or the opening rounds off a triangle's tips."""
    ys, xs = np.nonzero(mask)
    area, cx, cy = len(xs), xs.mean() + 0.5, ys.mean() + 0.5
    y = np.arange(mask.shape[0])[:, None] + 0.5 - cy
    x = np.arange(mask.shape[1])[None, :] + 0.5 - cx
    fits = {}
    side = np.sqrt(4 * area / np.pi)
    fits["circle"] = (x ** 2 + y ** 2 <= side ** 2 / 4, side, cx, cy)
    side = np.sqrt(area)
    fits["square"] = ((np.abs(x) <= side / 2) & (np.abs(y) <= side / 2), side, cx, cy)
    side = np.sqrt(2 * area)  # the centroid is 2/3 of the way from apex to base
    apex = -2 * side / 3
    fits["triangle"] = ((y >= apex) & (y <= side / 3) & (np.abs(x) <= (y - apex) / 2), side, cx, cy - side / 6)
    side = np.sqrt(2 * area)  # a rectangle is as wide as its size and half as tall
    fits["rectangle"] = ((np.abs(x) <= side / 2) & (np.abs(y) <= side / 4), side, cx, cy)
    result = {}
    for name, (ideal, side, bx, by) in fits.items():
        overlap = (mask & ideal).sum()
        result[name] = (float(overlap / (area + ideal.sum() - overlap)), float(side), float(bx), float(by))
    return result


def _describe(mask: np.ndarray, color: str) -> Found:
    h, w = mask.shape
    fits = fit_shapes(mask)
    shape = max(fits, key=lambda name: fits[name][0])
    iou, side, bx, by = fits[shape]
    size = "large" if side / max(h, w) > SIZE_SPLIT else "small"
    centre = np.array([bx / w, by / h], np.float32)
    position = list(POSITIONS)[int(np.linalg.norm(_ANCHORS - centre, axis=1).argmin())]
    return Found(color, shape if iou >= MIN_SHAPE_IOU else "blob", size, position, float(mask.sum()) / (h * w))


def parse_image(image) -> tuple[list[Found], str]:
    """The objects in an image (largest first) and the background colour name ('unknown' when the
    border has no palette colour)."""
    classes = classify(image)
    border = np.concatenate([classes[0], classes[-1], classes[:, 0], classes[:, -1]])
    border = border[border >= 0]
    if border.size == 0:
        return [], "unknown"
    background = int(np.bincount(border).argmax())
    objects = _opening(np.where(classes == background, -1, classes))
    labels = label(objects).ravel()
    ids, counts = np.unique(labels[labels < labels.size], return_counts=True)
    found = []
    for component in ids[counts >= MIN_AREA * labels.size]:
        mask = (labels == component).reshape(classes.shape)
        found.append(_describe(mask, NAMES[objects.flat[component]]))
    return sorted(found, key=lambda f: -f.area), NAMES[background]


def _fits(wanted: Wanted, found: Found) -> bool:
    stated = (wanted.color, wanted.shape, wanted.size, wanted.position)
    seen = (found.color, found.shape, found.size, found.position)
    return all(want is None or want == got for want, got in zip(stated, seen))


def matches(prompt: str | Prompt, found: list[Found], background: str) -> bool:
    """Whether parsed objects satisfy a prompt: the stated background, exactly as many objects, and
    some one-to-one assignment of found objects to wanted ones with every stated attribute."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if prompt.background is not None and prompt.background != background:
        return False
    if len(found) != len(prompt.objects):
        return False
    return any(all(map(_fits, prompt.objects, order)) for order in itertools.permutations(found))


def score(prompt: str | Prompt, image) -> bool:
    """Whether the image shows what the prompt states, and nothing more (see `matches`)."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    return matches(prompt, *parse_image(image))


# Why an image fails its prompt, in the order `failure` tries them (the first that fits names it).
FAILURES = ("background", "missing object", "extra object", "blob", "position swap", "position", "size", "binding",
            "colour", "shape", "several")


def _loosen(prompt: Prompt, **unstated) -> Prompt:
    return replace(prompt, objects=tuple(replace(o, **unstated) for o in prompt.objects))


def failure(prompt: str | Prompt, image) -> str | None:
    """None when the image is right, else why not (one of FAILURES): a wrong background; fewer or more
    objects than asked; an object no ideal shape fits; then the one attribute that, left unstated,
    makes the image right (position, size, colour, shape), except that a position error where every
    stated position holds an object, the wrong one, is 'position swap', and a colour error where the
    image has exactly the two colours asked, on the wrong objects, is 'binding'; 'several' for the rest."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    found, background = parse_image(image)
    if matches(prompt, found, background):
        return None
    if prompt.background is not None and prompt.background != background:
        return "background"
    if len(found) != len(prompt.objects):
        return "missing object" if len(found) < len(prompt.objects) else "extra object"
    if any(f.shape == "blob" for f in found):
        return "blob"
    fits = {k: matches(_loosen(prompt, **{k: None}), found, background) for k in ("position", "size", "color", "shape")}
    if fits["position"]:
        stated = {o.position for o in prompt.objects if o.position is not None}
        swapped = len(found) == 2 and stated <= {f.position for f in found}
        return "position swap" if swapped else "position"
    if fits["size"]:
        return "size"
    colours = sorted(o.color for o in prompt.objects if o.color is not None)
    if fits["color"] and len(colours) == 2 and colours == sorted(f.color for f in found):
        return "binding"
    return "colour" if fits["color"] else "shape" if fits["shape"] else "several"


def failures(prompts: list[str], images) -> dict[int, Counter]:
    """`failure` of each image, counted per number of objects in the prompt: {1: Counter, 2: Counter},
    right images counted under 'right'."""
    if len(prompts) != len(images):
        raise FewstepError(f"failures(): {len(prompts)} prompts but {len(images)} images")
    out = {1: Counter(), 2: Counter()}
    for text, image in zip(prompts, images):
        prompt = parse_prompt(text)
        out[len(prompt.objects)][failure(prompt, image) or "right"] += 1
    return out


def accuracy(prompts: list[str], images) -> dict:
    """Fraction of prompts whose image scores correct: one-object, two-object and all (nan where a
    group is empty), with the group sizes."""
    if len(prompts) != len(images):
        raise FewstepError(f"accuracy(): {len(prompts)} prompts but {len(images)} images")
    parsed = [parse_prompt(p) for p in prompts]
    right = np.array([score(p, image) for p, image in zip(parsed, images)], bool)
    two = np.array([len(p.objects) == 2 for p in parsed], bool)

    def frac(mask):
        return float(right[mask].mean()) if mask.any() else float("nan")

    return {"one": frac(~two), "two": frac(two), "all": frac(np.ones_like(two)),
            "n_one": int((~two).sum()), "n_two": int(two.sum())}
