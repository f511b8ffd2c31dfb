"""How well a shapes model edits images, read back by the shapes evaluator (`fewstep eval --edits`).

- Recolour (image to image): a rendered one-object scene and its full caption with only the object's
  colour changed, at `strength`. Right when the image holds exactly one object whose shape and position
  are the source's ("layout kept") and whose colour is the new one ("new colour").
- Replace (inpainting): a rendered two-object scene whose objects lie on either side of the image's
  middle (left / right or top / bottom); the half holding the second object is masked, and the prompt
  puts another object there (another shape and colour, the same size and position). Right when an
  object of the new shape and colour is at that position; with `overlay` the pixels outside the mask
  must equal the source's exactly ("outside kept").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .caption import caption
from .evaluate import parse_image
from .render import COLORS, POSITIONS, SHAPES, Obj, Scene, contact_sheet, render, sample_scene


@dataclass(frozen=True)
class Case:
    source: np.ndarray  # uint8 [H, W, 3]
    prompt: str
    want: Obj  # the object the edit should produce (new colour, or the new object)
    keep: Obj | None = None  # inpainting: the object outside the mask
    mask: np.ndarray | None = None  # uint8 [H, W], 255 = repaint


def _other(rng: np.random.Generator, names, avoid) -> str:
    names = [n for n in names if n not in avoid]
    return names[int(rng.integers(len(names)))]


def recolour_cases(seed: int, n: int, size: int = 128) -> list[Case]:
    """n one-object scenes and prompts that change only the object's colour."""
    rng, cases = np.random.default_rng(seed), []
    for _ in range(n):
        scene = sample_scene(rng, 1)
        obj = scene.objects[0]
        new = replace(obj, color=_other(rng, COLORS, {obj.color, scene.background}))
        cases.append(Case(render(scene, size), caption(replace(scene, objects=(new,))), new))
    return cases


def _split(a: Obj, b: Obj) -> tuple[int, bool] | None:
    """(axis, b on the far side) when a and b lie on either side of the middle along x (0) or y (1)."""
    for axis in (0, 1):
        pa, pb = POSITIONS[a.position][axis], POSITIONS[b.position][axis]
        if (pa - 0.5) * (pb - 0.5) < 0:
            return axis, pb > 0.5
    return None


def replace_cases(seed: int, n: int, size: int = 128) -> list[Case]:
    """n two-object scenes split by the middle, the half holding the second object masked, and prompts
    that put another object (shape and colour) in its place."""
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < n:
        scene = sample_scene(rng, 2)
        keep, old = scene.objects
        split = _split(keep, old)
        if split is None:
            continue
        new = replace(old, shape=_other(rng, SHAPES, {old.shape}),
                      color=_other(rng, COLORS, {old.color, keep.color, scene.background}))
        mask = np.zeros((size, size), np.uint8)
        axis, far = split
        half = slice(size // 2, size) if far else slice(0, size // 2)
        mask[(slice(None), half) if axis == 0 else (half, slice(None))] = 255
        cases.append(Case(render(scene, size), caption(replace(scene, objects=(keep, new))), new, keep, mask))
    return cases


def score_recolour(case: Case, image) -> tuple[bool, bool]:
    """(layout kept, new colour) of one generated image."""
    found, _ = parse_image(np.asarray(image))
    if len(found) != 1:
        return False, False
    f = found[0]
    return (f.shape, f.position) == (case.want.shape, case.want.position), f.color == case.want.color


def score_replace(case: Case, image) -> tuple[bool, float, float]:
    """(the new object is there, the largest and the mean pixel difference outside the mask) of one image."""
    a = np.asarray(image)
    found, _ = parse_image(a)
    there = any((f.color, f.shape, f.position) == (case.want.color, case.want.shape, case.want.position)
                for f in found)
    outside = case.mask == 0
    diff = np.abs(a.astype(np.int16) - case.source.astype(np.int16))[outside]
    return there, float(diff.max()) if diff.size else 0.0, float(diff.mean()) if diff.size else 0.0


def run(pipe, n: int = 200, seed: int = 0, strength: float = 0.6, steps: int | None = None,
        overlay: bool = True) -> tuple[dict, list, list]:
    """Both studies on n cases each: the figures, and the (case, image) pairs of each for a grid."""
    recolour, replaced = recolour_cases(seed, n), replace_cases(seed + 1, n)
    made = [(c, pipe(c.prompt, image=Image.fromarray(c.source), strength=strength, steps=steps, seed=seed + i,
                     progress=False)[0]) for i, c in enumerate(recolour)]
    kept = [score_recolour(c, im) for c, im in made]
    painted = [(c, pipe(c.prompt, image=Image.fromarray(c.source), mask_image=Image.fromarray(c.mask), steps=steps,
                        seed=seed + i, overlay=overlay, progress=False)[0]) for i, c in enumerate(replaced)]
    there = [score_replace(c, im) for c, im in painted]
    figures = {"n": n, "strength": strength, "layout_kept": np.mean([k[0] for k in kept]),
               "new_colour": np.mean([k[1] for k in kept]), "both": np.mean([k[0] and k[1] for k in kept]),
               "new_object": np.mean([t[0] for t in there]), "outside_max_diff": max(t[1] for t in there),
               "outside_mean_diff": np.mean([t[2] for t in there]), "overlay": overlay}
    return figures, made, painted


def markdown(figures: dict, model: str) -> str:
    f = figures
    return "\n".join([
        "| model | cases | recolour at strength | layout kept | new colour | both | replace: new object | "
        "outside the mask: mean, max difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {model} | {f['n']} + {f['n']} | {f['strength']:g} | {f['layout_kept']:.1%} | {f['new_colour']:.1%} | "
        f"{f['both']:.1%} | {f['new_object']:.1%} | {f['outside_mean_diff']:.2f}, {f['outside_max_diff']:.0f} / 255 "
        f"({'overlay' if f['overlay'] else 'no overlay'}) |"])


def grid(made: list, painted: list, rows: int = 4) -> Image.Image:
    """Rows of: source, recoloured; source, mask, inpainted; each captioned with its prompt."""
    images, captions = [], []
    for (c, im), (p, pim) in zip(made[:rows], painted[:rows]):
        images += [c.source, np.asarray(im), p.source, np.stack([p.mask] * 3, -1), np.asarray(pim)]
        captions += ["source", f"recolour: {c.prompt}", "source", "mask", f"inpaint: {p.prompt}"]
    return contact_sheet(images, captions, cols=5, width=180)
