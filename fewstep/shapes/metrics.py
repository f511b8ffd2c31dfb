"""`fewstep eval`: how good and how fast a shapes model is, on a fixed seeded prompt set.

Reports, per step count: exact accuracy of one- and two-object prompts (the evaluator in
`fewstep.shapes.evaluate` parses each image back into objects), the tiny-CLIP score (cosine
similarity of image and prompt embeddings, x100 as CLIPScore does), a Fréchet distance between
generated images and renderer images in the tiny-CLIP image-feature space (FID's formula, Heusel et
al. 2017, with the domain's own feature model in place of Inception), and images per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FewstepError
from ..imaging import from_uint8, to_uint8
from ..loading.hub import ASSETS
from . import data
from .caption import sample_prompts
from .clip import load_clip
from .evaluate import accuracy
from .render import contact_sheet


@dataclass(frozen=True)
class EvalResult:
    steps: int
    one: float
    two: float
    n_one: int
    n_two: int
    clip_score: float | None
    fid: float | None
    images_per_second: float


def generate(pipe, prompts: list[str], seed: int = 0, batch: int = 16, **kw) -> np.ndarray:
    """uint8 images [N, H, W, 3] for `prompts`; prompt i uses seed + i, whatever the batch size."""
    out = []
    for j in range(0, len(prompts), batch):
        x = pipe(prompts[j:j + batch], seed=seed + j, progress=False, output_type="pt", **kw)
        out.append(to_uint8(x))
    return np.concatenate(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D], in float64.
    Tr((S_a S_b)^1/2) = sum of sqrt(eig(S_a^1/2 S_b S_a^1/2)), a symmetric PSD matrix."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * cross)


def evaluate(pipe, prompts: list[str], steps: int, seed: int = 0, clip=None, reference: np.ndarray | None = None,
             batch: int = 16, **kw) -> tuple[EvalResult, np.ndarray]:
    """Score `pipe` on `prompts` at `steps`. `clip` is a tiny-CLIP model with `features(images)` and
    `score(images, prompts)` (both taking [N, 3, H, W] in [-1, 1]); `reference` are renderer images
    for the Fréchet distance. Returns the result and the generated images."""
    t0 = time.perf_counter()
    images = generate(pipe, prompts, seed, batch, steps=steps, **kw)
    seconds = time.perf_counter() - t0
    acc = accuracy(prompts, list(images))
    score = fid = None
    if clip is not None:
        with torch.no_grad():
            x = from_uint8(images)
            score = float(clip.score(x, prompts).mean()) * 100
            if reference is not None:
                fid = frechet_distance(clip.features(x), clip.features(from_uint8(reference)))
    return EvalResult(steps, acc["one"], acc["two"], acc["n_one"], acc["n_two"], score, fid,
                      len(prompts) / seconds), images


def markdown(results: list[EvalResult], model: str) -> str:
    lines = [f"| model | steps | one-object | two-object | tiny-CLIP score | Fréchet dist. | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        clip = "-" if r.clip_score is None else f"{r.clip_score:.2f}"
        fid = "-" if r.fid is None else f"{r.fid:.3f}"
        lines.append(f"| {model} | {r.steps} | {r.one:.1%} ({r.n_one}) | {r.two:.1%} ({r.n_two}) | {clip} | {fid} "
                     f"| {r.images_per_second:.1f} |")
    return "\n".join(lines)


def eval_set(seed: int, n: int, clip: bool = True, clip_folder=None) -> tuple[list[str], object, np.ndarray | None]:
    """What `fewstep eval` scores against: the fixed prompts `sample_prompts(seed, n)`, the tiny-CLIP
    scorer (None with clip=False) and, for the Fréchet distance, n renderer images of seed + 1."""
    if not clip:
        return sample_prompts(seed, n), None, None
    return sample_prompts(seed, n), TinyCLIPScorer(clip_folder), data.batch(seed + 1, n, drop=0.0)[0]


class TinyCLIPScorer:
    """The shipped tiny CLIP (fewstep/assets/shapes-clip) as `evaluate` wants it: `score(x, prompts)`
    (cosine similarity of image and prompt embeddings) and `features(x)`, x in [-1, 1]."""

    def __init__(self, folder=None):
        folder = Path(folder) if folder else ASSETS / "shapes-clip" / "clip"
        if not (folder / "image_tower.safetensors").is_file():
            raise FewstepError(f"no tiny-CLIP model in {folder}: pass --clip RUN/clip (from `fewstep train`) "
                               "or --no-clip")
        self.model, self.tokenizer = load_clip(folder)

    def score(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.model.encode_image(x) * self.model.encode_text(self.tokenizer(prompts))).sum(-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def sample_grid(columns: dict[int, np.ndarray], prompts: list[str], rows: int = 6):
    """prompts x step counts: row r shows prompt r at each step count, captioned "N steps: prompt"."""
    images, captions = [], []
    for r in range(rows):
        for steps, ims in columns.items():
            images.append(ims[r])
            captions.append(f"{steps} step{'s' if steps > 1 else ''}: {prompts[r]}")
    return contact_sheet(images, captions, cols=len(columns), width=200)
