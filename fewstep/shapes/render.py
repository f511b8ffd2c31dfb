"""The deterministic scene renderer: one or two non-overlapping, flat-coloured, anti-aliased shapes on
a flat background, sampled from a seed and drawn on the fly (no files, no dataset to download).

The vocabulary here (colours, shapes, sizes, positions) is the vocabulary of the public caption
grammar (caption.py, docs/shapes.md); evaluate.py parses images back into the same terms.
Anti-aliasing is 4x supersampling then a box filter, so every object interior and the background
keep their exact palette RGB and only the edge pixels blend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import FewstepError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 170, 60), "blue": (30, 80, 230), "yellow": (245, 210, 30),
    "purple": (140, 50, 180), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shapes the shipped models never saw: the grammar, renderer and evaluator know them, the scene sampler
# draws them only when asked (`sample_scene(shapes=...)`); docs/lora.md teaches one with a LoRA.
NEW_SHAPES = ("rectangle",)  # lying flat: as wide as the size, half as tall
ALL_SHAPES = SHAPES + NEW_SHAPES
SIZES = {"small": 0.2, "large": 0.4}  # side of the shape's bounding box, as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {  # (cx, cy) of the bounding box, as fractions of the side
    "in the center": (0.5, 0.5), "on the left": (0.25, 0.5), "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25), "at the bottom": (0.5, 0.75),
    "at the top left": (0.25, 0.25), "at the top right": (0.75, 0.25),
    "at the bottom left": (0.25, 0.75), "at the bottom right": (0.75, 0.75),
}
# Anchors are 0.25 apart, so the nearest-anchor boundary is 0.125 away: a 0.03 jitter keeps every
# position unambiguous, and a large shape at an edge anchor still ends 0.02 inside the image.
JITTER = 0.03
MARGIN = 0.03  # smallest gap between two shapes' bounding boxes, so they never touch
SUPERSAMPLE = 4
MIN_SIZE = 32  # below this the small shapes are a few pixels wide and the evaluator cannot read them


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)  # jitter of the centre from its anchor, fractions of the side

    def __post_init__(self):
        for kind, value, allowed in (("colour", self.color, COLORS), ("shape", self.shape, ALL_SHAPES),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise FewstepError(f"unknown {kind} {value!r}: use one of {', '.join(allowed)}")

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box, as fractions of the image side."""
        (ax, ay), (dx, dy), half = POSITIONS[self.position], self.offset, SIZES[self.size] / 2
        return ax + dx - half, ay + dy - half, ax + dx + half, ay + dy + half


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    def __post_init__(self):
        if self.background not in COLORS:
            raise FewstepError(f"unknown background colour {self.background!r}: use one of {', '.join(COLORS)}")
        if not 1 <= len(self.objects) <= 2:
            raise FewstepError(f"a scene has one or two objects, not {len(self.objects)}")
        if any(o.color == self.background for o in self.objects):
            raise FewstepError(f"the background colour {self.background!r} must differ from every object's")
        if len(self.objects) == 2 and not _apart(*self.objects):
            raise FewstepError("two objects must be at different positions and must not overlap")


def _apart(a: Obj, b: Obj) -> bool:
    """Different positions and bounding boxes at least MARGIN apart along some axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box(), b.box()
    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
    return a.position != b.position and gap >= MARGIN


def _pick(rng: np.random.Generator, names) -> str:
    names = list(names)
    return names[int(rng.integers(len(names)))]


def _place(rng: np.random.Generator, color: str, shape: str, size: str) -> Obj:
    offset = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    return Obj(color, shape, size, _pick(rng, POSITIONS), offset)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, shapes=SHAPES,
                 must: str | None = None) -> Scene:
    """A random scene: 1 or 2 objects (half each unless `n_objects` is given), never overlapping,
    on a background whose colour no object has; shapes from `shapes` (the shipped models' by default),
    the first object a `must` when given. With the default arguments the draws are the same as ever."""
    n = n_objects if n_objects is not None else 1 + int(rng.random() < 0.5)
    if n not in (1, 2):
        raise FewstepError(f"n_objects must be 1 or 2, not {n}")
    looks = [(_pick(rng, COLORS), _pick(rng, shapes), _pick(rng, SIZES)) for _ in range(n)]
    if must is not None:
        looks[0] = (looks[0][0], must, looks[0][2])
    # Re-draw only the placements, so sizes stay uniform; every pair of sizes fits somewhere
    # (opposite sides, say), so this ends: after 2.2 tries on average.
    while True:
        objects = tuple(_place(rng, *look) for look in looks)
        if n == 1 or _apart(*objects):
            break
    background = _pick(rng, [c for c in COLORS if c not in {o.color for o in objects}])
    return Scene(objects, background)


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] RGB array."""
    return draw(scene, size, COLORS[scene.background], {o: COLORS[o.color] for o in scene.objects})


def draw(scene: Scene, size: int, background: tuple[int, int, int], fills: dict) -> np.ndarray:
    """The scene's shapes filled with `fills[obj]` on `background` (RGB), anti-aliased: uint8 [size, size, 3].
    `render` draws the palette colours; control maps (control.py) draw silhouettes with it."""
    if size < MIN_SIZE:
        raise FewstepError(f"image size {size} is too small to draw shapes on: use {MIN_SIZE} or more (128 default)")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (round(v * big) for v in obj.box())
        fill = fills[obj]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)  # PIL's boxes include their last pixel
        elif obj.shape == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "triangle":  # isosceles, apex up, base = height = the size: a square bounding box too
            pen.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:  # rectangle: the middle half of the box's height
            quarter = (y1 - y0) / 4
            pen.rectangle((x0, round(y0 + quarter), x1 - 1, round(y1 - quarter) - 1), fill=fill)
    return np.asarray(image.reduce(SUPERSAMPLE))


def contact_sheet(images, captions: list[str], cols: int = 4, width: int = 200) -> Image.Image:
    """A grid of images, each with its caption wrapped beneath: for docs and training previews."""
    font = ImageFont.load_default(size=13)
    lines = [_wrap(c, font, width - 8) for c in captions]
    text_h = 16 * max(len(ls) for ls in lines) + 8
    rows = -(-len(lines) // cols)
    sheet = Image.new("RGB", (cols * width, rows * (width + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, lines)):
        x, y = (i % cols) * width, (i // cols) * (width + text_h)
        sheet.paste(Image.fromarray(np.asarray(image)).resize((width - 8, width - 8), Image.LANCZOS), (x + 4, y + 4))
        for j, line in enumerate(text):
            draw.text((x + 4, y + width + 16 * j), line, fill="black", font=font)
    return sheet


def _wrap(text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(joined) > width:
            lines.append(word)
        else:
            lines[-1] = joined
    return lines
