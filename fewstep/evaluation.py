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

import numpy as np
import torch


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


def generate(pipe, prompts: list[str], steps: int, seed: int, batch: int = 16, **kw) -> tuple[np.ndarray, float]:
    """uint8 images [N, H, W, 3] for `prompts` (prompt i uses seed + i, whatever the batch) and the seconds taken."""
    out, t0 = [], time.perf_counter()
    for j in range(0, len(prompts), batch):
        x = pipe(prompts[j:j + batch], steps=steps, seed=seed + j, progress=False, output_type="pt", **kw)
        out.append(((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out), time.perf_counter() - t0


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


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W] in [-1, 1]


def evaluate(pipe, prompts: list[str], steps: int, seed: int = 0, clip=None, reference: np.ndarray | None = None,
             batch: int = 16, **kw) -> tuple[EvalResult, np.ndarray]:
    """Score `pipe` on `prompts` at `steps`. `clip` is a tiny-CLIP model with `features(images)` and
    `score(images, prompts)` (both taking [N, 3, H, W] in [-1, 1]); `reference` are renderer images
    for the Fréchet distance. Returns the result and the generated images."""
    from .shapes.evaluate import accuracy
    images, seconds = generate(pipe, prompts, steps, seed, batch, **kw)
    acc = accuracy(prompts, list(images))
    score = fid = None
    if clip is not None:
        with torch.no_grad():
            x = _to_tensor(images)
            score = float(clip.score(x, prompts).mean()) * 100
            if reference is not None:
                fid = frechet_distance(clip.features(x), clip.features(_to_tensor(reference)))
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
