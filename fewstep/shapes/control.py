"""Control maps of shapes-world scenes, and the scenes and captions a ControlNet for the built-in model is
trained and scored on (docs/controlnet.md, "ControlNet for the built-in model").

Two conditions, both [size, size, 3] uint8 images as a ControlNet reads them (diffusers' convention: white on
black, RGB):

- `layout`: each object's silhouette filled white on black (no colour), anti-aliased as the renderer draws
  the scene: it fixes the shapes, sizes and positions, and leaves colours to the prompt.
- `canny`: the rendered scene's edges, white on black: a pixel is an edge where it differs from its right or
  lower neighbour by more than EDGE_STEP in some channel. Canny's smoothing, non-maximum suppression and
  hysteresis exist to thin the blurred gradients of photographs; the renders are flat colours with
  one-pixel anti-aliased borders, so a threshold on neighbour differences already gives thin closed
  outlines, and the shapes world keeps its numpy-only dependencies (no OpenCV).

A case's caption is the full caption (each optional part dropped at `drop`), a colour-only one that names the
objects' colours and nothing else ("a red and a blue"), or the empty prompt: with colour-only and empty
captions the control map alone must decide shapes and positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import FewstepError
from ..imaging import to_uint8
from .caption import caption
from .evaluate import Found, parse_image
from .render import POSITIONS, Scene, contact_sheet, draw, render, sample_scene

CONDITIONS = ("layout", "canny")
EDGE_STEP = 24  # of 255: the faintest edge between two palette colours differs by more than this
KINDS = ("full", "colours", "empty")
TRAIN_KINDS = (0.3, 0.6, 0.1)  # training captions: full (with drop), colour-only, empty (docs/controlnet.md)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def control_map(scene: Scene, condition: str, size: int = 128) -> np.ndarray:
    """The scene's control image for `condition` (layout or canny): uint8 [size, size, 3], white on black."""
    if condition == "layout":
        return draw(scene, size, BLACK, {o: WHITE for o in scene.objects})
    if condition == "canny":
        image = render(scene, size).astype(np.int16)
        edge = np.zeros(image.shape[:2], bool)
        edge[:, :-1] |= np.abs(image[:, 1:] - image[:, :-1]).max(-1) > EDGE_STEP
        edge[:-1] |= np.abs(image[1:] - image[:-1]).max(-1) > EDGE_STEP
        return np.repeat(np.where(edge, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    raise FewstepError(f"unknown control condition {condition!r}: use one of {', '.join(CONDITIONS)}")


def reading_order(scene: Scene) -> list:
    """The scene's objects as one reads them: the upper first, then left to right (by their positions' anchors)."""
    return sorted(scene.objects, key=lambda o: POSITIONS[o.position][::-1])


def colour_caption(scene: Scene) -> str:
    """The objects' colours only, in reading order (the upper object first, then left to right): 'a red and a
    blue'. Named in a fixed order, the colours say which silhouette of the map is which."""
    return " and ".join(_a(o.color) for o in reading_order(scene))


def text_for(scene: Scene, kind: str, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    if kind == "full":
        return caption(scene, rng, drop)
    return colour_caption(scene) if kind == "colours" else ""


def training_batch(seed: int, n: int, condition: str, size: int = 128, drop: float = 0.3
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n rendered scenes [n, size, size, 3], their control maps and captions (full with parts dropped at
    `drop`, colour-only or empty, TRAIN_KINDS of the time), the same for the same seed."""
    rng = np.random.default_rng(seed)
    scenes, texts = [], []
    for _ in range(n):
        scenes.append(sample_scene(rng))
        texts.append(text_for(scenes[-1], KINDS[int(rng.choice(3, p=TRAIN_KINDS))], rng, drop))
    images = np.stack([render(s, size) for s in scenes])
    return images, np.stack([control_map(s, condition, size) for s in scenes]), texts


@dataclass(frozen=True)
class Case:
    """One held-out scene, its prompt and which kind of prompt it is (full or colours)."""

    scene: Scene
    prompt: str
    kind: str


def held_out(seed: int, n: int) -> list[Case]:
    """n scenes of seed `seed` (training draws from other seeds: its seeds are stage hashes), half one- and half
    two-object in random order, alternately prompted with the full caption and the colour-only one."""
    rng = np.random.default_rng(seed)
    counts = rng.permutation([2] * round(n / 2) + [1] * (n - round(n / 2)))
    cases = []
    for i, k in enumerate(counts):
        scene = sample_scene(rng, int(k))
        kind = KINDS[i % 2]
        cases.append(Case(scene, text_for(scene, kind), kind))
    return cases


def judge(case: Case, found: list[Found], background: str) -> dict[str, bool]:
    """Whether the objects read back match the control's: 'layout' (as many objects, one-to-one with the same
    shape and position), 'size' (and the same size), 'right' (layout, and the colours the prompt names: each
    object's own and the background for a full caption, the set of colours for a colour-only one)."""
    objects = case.scene.objects
    if len(found) != len(objects):
        return {"layout": False, "size": False, "right": False}
    orders = [o for o in itertools.permutations(found)
              if all(f.shape == s.shape and f.position == s.position for f, s in zip(o, objects))]
    sized = [o for o in orders if all(f.size == s.size for f, s in zip(o, objects))]
    if case.kind == "full":
        right = background == case.scene.background and any(
            all(f.color == s.color for f, s in zip(o, objects)) for o in orders)
    else:
        right = bool(orders) and sorted(f.color for f in found) == sorted(s.color for s in objects)
    return {"layout": bool(orders), "size": bool(sized), "right": right}


def figures(cases: list[Case], verdicts: list[dict[str, bool]]) -> dict[str, dict[str, float]]:
    """Per kind of prompt (full, colours) and over all: the fraction of cases right by each of `judge`'s
    measures, and how many cases there were ('n')."""
    out = {}
    for kind in ("full", "colours", "all"):
        rows = [v for c, v in zip(cases, verdicts) if kind in ("all", c.kind)]
        out[kind] = {k: float(np.mean([v[k] for v in rows])) if rows else float("nan")
                     for k in ("layout", "size", "right")}
        out[kind]["n"] = len(rows)
    return out


def run(pipe, cases: list[Case], condition: str, steps: int | None = None, seed: int = 0, scale: float = 1.0,
        control: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """Generate each case (seed + i) with its control map (control=False: the prompt alone; the pipeline then
    has no ControlNet loaded), read the objects back and judge them. Returns the figures, the images and the
    control maps (uint8 [N, H, W, 3] each)."""
    size = pipe.defaults.size or pipe.unet.cfg.sample_size * pipe.vae_scale
    images, maps = [], []
    for i, case in enumerate(cases):
        maps.append(control_map(case.scene, condition, size))
        kw = {"control_image": Image.fromarray(maps[-1]), "controlnet_conditioning_scale": scale} if control else {}
        x = pipe(case.prompt, seed=seed + i, steps=steps, progress=False, output_type="pt", **kw)
        images.append(to_uint8(x)[0])
    verdicts = [judge(c, *parse_image(im)) for c, im in zip(cases, images)]
    return figures(cases, verdicts), np.stack(images), np.stack(maps)


def markdown(rows: list[tuple[str, dict]]) -> str:
    """| run | prompts | cases | shapes + positions | + sizes | + named colours |, one line per run and kind."""
    lines = ["| run | prompts | cases | shapes + positions | + sizes | + named colours (right) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, fig in rows:
        for kind in ("full", "colours", "all"):
            f = fig[kind]
            lines.append(f"| {name} | {kind} | {f['n']} | {f['layout']:.1%} | {f['size']:.1%} | {f['right']:.1%} |")
    return "\n".join(lines)


def grid(cases: list[Case], maps: np.ndarray, controlled: np.ndarray, plain: np.ndarray | None = None,
         rows: int = 6):
    """Control map | image with it (| image without it), one case a row, captioned with the prompt."""
    images, captions = [], []
    for i in range(min(rows, len(cases))):
        prompt = cases[i].prompt or "(empty prompt)"
        images += [maps[i], controlled[i]] + ([plain[i]] if plain is not None else [])
        captions += [f"control: {prompt}", "with ControlNet"] + (["without"] if plain is not None else [])
    return contact_sheet(images, captions, cols=2 if plain is None else 3, width=200)
