"""`fewstep eval --compare RUN_A RUN_B`: the same prompts and seeds side by side, and the figures' differences.

How people compare samplers, step counts, LoRAs and speed options: two batch runs over one prompt file,
paired by (prompt, seed); a grid PNG of the first pairs and a markdown table (speed, CLIP score with a
CLIP model, the FID of B against A, how far apart the paired images are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import FewstepError
from .clip import Clip
from .run import clip_scores, fid, run_records, speed

CELL = 192


def pairs(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """The records of A and B with the same prompt and seed, in A's row order."""
    by_key = {(r["prompt"], r["seed"]): r for r in b}
    return [(r, by_key[(r["prompt"], r["seed"])]) for r in a if (r["prompt"], r["seed"]) in by_key]


def grid(runs: tuple[Path, Path], matched: list[tuple[dict, dict]], rows: int) -> Image.Image:
    """A row per pair (A's image, B's image) under a header naming the runs, each row captioned with its prompt."""
    shown = matched[:rows]
    sheet = Image.new("RGB", (2 * CELL, 20 + len(shown) * (CELL + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, run in enumerate(runs):
        draw.text((col * CELL + 4, 4), run.name[:30], fill="black")
    for row, pair in enumerate(shown):
        top = 20 + row * (CELL + 16)
        for col, (run, record) in enumerate(zip(runs, pair)):
            image = Image.open(run / record["file"]).convert("RGB")
            image.thumbnail((CELL, CELL))
            sheet.paste(image, (col * CELL, top))
        draw.text((4, top + CELL + 2), f"{pair[0]['prompt'][:56]} (seed {pair[0]['seed']})", fill="black")
    return sheet


def pixel_distance(runs: tuple[Path, Path], matched: list[tuple[dict, dict]]) -> float | None:
    """Mean |Δpixel| (0-255) over the pairs of the same size; None if no pair has one size."""
    diffs = []
    for ra, rb in matched:
        x, y = (np.asarray(Image.open(run / r["file"]).convert("RGB"), np.float64) for run, r in zip(runs, (ra, rb)))
        if x.shape == y.shape:
            diffs.append(np.abs(x - y).mean())
    return round(float(np.mean(diffs)), 3) if diffs else None


def compare(a: str | Path, b: str | Path, out: str | Path, clip: Clip | None = None, rows: int = 16,
            progress: bool = True) -> str:
    """OUT/compare.png and OUT/compare.md for runs A and B; returns the markdown."""
    runs = (Path(a), Path(b))
    records = [run_records(r) for r in runs]
    matched = pairs(*records)
    if not matched:
        raise FewstepError(f"--compare {a} {b}: no image of one has the prompt and seed of an image of the other")
    mine = [[p[i] for p in matched] for i in (0, 1)]
    table = [("pairs (same prompt and seed)", len(matched), len(matched))]
    table += [(k, *(speed(m)[k] for m in mine)) for k in ("s_per_image", "images_per_s")]
    if clip is not None:
        table.append(("CLIP score", *(clip_scores(run, m, clip, None, progress)["all"] for run, m in zip(runs, mine))))
        if len(matched) >= 2:
            table.append(("FID (CLIP features) against A", None,
                          fid(clip, [runs[0] / r["file"] for r in mine[0]], [runs[1] / r["file"] for r in mine[1]])))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid(runs, matched, rows).save(out / "compare.png")
    lines = [f"| | A: {runs[0]} | B: {runs[1]} | B - A |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {'' if x is None else x} | {y} | {_diff(x, y)} |" for name, x, y in table]
    lines.append(f"| mean abs pixel difference of the pairs | | | {pixel_distance(runs, matched)} |")
    text = "\n".join(lines) + "\n\n![A and B side by side](compare.png)\n"
    (out / "compare.md").write_text(text, encoding="utf-8")
    return text


def _diff(x, y) -> str:
    return "" if x is None or y is None else f"{y - x:+.4g}"
