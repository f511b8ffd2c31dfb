"""Rendered scenes with their captions, drawn from a seed: the shapes world's data stream (training,
evaluation references)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import FewstepError
from .caption import caption
from .render import ALL_SHAPES, NEW_SHAPES, Scene, render, sample_scene


def batch(seed: int, n: int, size: int = 128, drop: float = 0.3,
          two: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n images [n, size, size, 3] uint8, their captions and scenes; the same for the same (seed, n),
    and batch(seed, m) is a prefix of batch(seed, n) for m < n. Each optional caption part (size,
    position, background) is left out with probability `drop`; a scene has two objects with
    probability `two` (the default 0.5 draws exactly what `sample_scene(rng)` draws)."""
    if not (0 <= drop <= 1 and 0 <= two <= 1):
        raise FewstepError(f"drop and two are probabilities between 0 and 1, not {drop} and {two}")
    rng = np.random.default_rng(seed)
    scenes, captions = [], []
    for _ in range(n):
        scenes.append(sample_scene(rng, 1 + int(rng.random() < two)))
        captions.append(caption(scenes[-1], rng, drop))
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, captions, scenes


def concept_batch(seed: int, n: int, shape: str, share: float = 0.5, size: int = 128,
                  drop: float = 0.3, two: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes of which a `share` hold the new `shape` (NEW_SHAPES) as their first object, any shape as
    the second, the rest drawn as ever; two objects with probability `two` (0.5 draws as `sample_scene`):
    data to teach a model a shape it has never seen (docs/lora.md)."""
    if shape not in NEW_SHAPES:
        raise FewstepError(f"--new-shape {shape!r}: the new shapes are {', '.join(NEW_SHAPES)}")
    if not (0 <= share <= 1 and 0 <= drop <= 1 and 0 <= two <= 1):
        raise FewstepError(f"share, drop and two are probabilities between 0 and 1, not {share}, {drop} and {two}")
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        new = rng.random() < share
        count = 1 + int(rng.random() < two)
        scenes.append(sample_scene(rng, count, ALL_SHAPES, must=shape) if new else sample_scene(rng, count))
    captions = [caption(s, rng, drop) for s in scenes]
    return np.stack([render(s, size) for s in scenes]), captions, scenes


def write_folder(out: str | Path, images: np.ndarray, captions: list[str]) -> Path:
    """NNNNN.png and NNNNN.txt (its caption) per image, the layout `fewstep train lora --data` and kohya's
    trainers read; each file written whole (a temporary name, then renamed)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FewstepError(f"{out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(tqdm(list(zip(images, captions)), desc="writing", mininterval=2.0)):
        stem = out / f"{i:05d}"
        Image.fromarray(image).save(f"{stem}.png.tmp", format="PNG")
        Path(f"{stem}.txt.tmp").write_text(text + "\n", encoding="utf-8")
        os.replace(f"{stem}.png.tmp", f"{stem}.png")
        os.replace(f"{stem}.txt.tmp", f"{stem}.txt")
    return out
