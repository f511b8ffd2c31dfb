"""Rendered scenes with their captions, drawn from a seed: the shapes world's data stream (training,
evaluation references)."""

from __future__ import annotations

import numpy as np

from ..errors import FewstepError
from .caption import caption
from .render import Scene, render, sample_scene


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
