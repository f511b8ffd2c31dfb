"""Generate the rows not done yet, batch by batch, each image recorded in the manifest once written."""

from __future__ import annotations

import hashlib
import html
import json
import resource
import time
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..outputs import save_image, writable
from ..request import resolve
from .rows import Row

MANIFEST = "manifest.jsonl"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def done(out: Path) -> dict[str, dict]:
    """The manifest's records whose file exists with the recorded hash (a re-run skips those rows)."""
    manifest = out / MANIFEST
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()] \
        if manifest.is_file() else []
    return {r["file"]: r for r in records if (out / r["file"]).is_file() and sha256(out / r["file"]) == r["sha256"]}


def file_name(row: Row, seed: int) -> str:
    return f"{row.index:05d}-{seed}.png"


def run_rows(pipe, rows: list[Row], out: str | Path, seed: int = 0, batch_size: int = 1,
             progress: bool = True) -> dict:
    """Images for `rows` into `out`: row i's seed is its own or seed + i; rows with the same settings run
    `batch_size` at a time. Returns counts, seconds and images/s."""
    out = Path(out)
    writable(out)
    out.mkdir(parents=True, exist_ok=True)
    finished = done(out)
    seeds = {r.index: int(r.settings.get("seed", seed + r.index)) for r in rows}
    todo = [r for r in rows if file_name(r, seeds[r.index]) not in finished]
    key = lambda r: json.dumps({k: v for k, v in r.settings.items() if k != "seed"}, sort_keys=True)  # noqa: E731
    t0, new = time.perf_counter(), []
    bar = tqdm(total=len(todo), desc="images", disable=not progress, mininterval=2.0)
    for _, same in groupby(sorted(todo, key=key), key=key):
        same = list(same)
        for start in range(0, len(same), batch_size):
            new += _batch(pipe, same[start:start + batch_size], seeds, out)
            bar.update(len(same[start:start + batch_size]))
    bar.close()
    seconds = time.perf_counter() - t0
    write_index(out, [*finished.values(), *new])
    made = len(new)
    return {"images": made, "skipped": len(rows) - len(todo), "seconds": round(seconds, 2),
            "images_per_s": round(made / seconds, 3) if made else None,
            "s_per_image": round(seconds / made, 4) if made else None, "peak_memory_mib": peak_memory_mib(pipe)}


def peak_memory_mib(pipe) -> float:
    """The run's peak memory: the GPU's allocated peak on CUDA, else the process's peak resident set."""
    if pipe.device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(pipe.device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _batch(pipe, rows: list[Row], seeds: dict[int, int], out: Path) -> list[dict]:
    """One model call for rows of the same settings; each image saved, then appended to the manifest.
    Returns the images' manifest records."""
    settings = {k: v for k, v in rows[0].settings.items() if k != "seed"}
    negative = settings.pop("negative_prompt", None)
    request = resolve(pipe.defaults, [r.prompt for r in rows], negative, **settings)
    request = replace(request, seeds=tuple(seeds[r.index] for r in rows))
    t0 = time.perf_counter()
    images = pipe.generate(request, progress=False)
    each = (time.perf_counter() - t0) / len(rows)
    records = []
    with (out / MANIFEST).open("a", encoding="utf-8") as manifest:
        for row, image in zip(rows, images):
            path = save_image(image, out / file_name(row, seeds[row.index]))
            record = {"file": path.name, "index": row.index, "prompt": row.prompt, "seed": seeds[row.index],
                      "steps": request.steps, "guidance": request.guidance, "sampler": request.sampler,
                      "width": request.width, "height": request.height, "negative_prompt": negative,
                      "seconds": round(each, 4), "sha256": sha256(path)}
            manifest.write(json.dumps(record) + "\n")
            records.append(record)
    return records


def write_index(out: Path, records: list[dict]) -> Path:
    """DIR/index.html: every image of the run's folder with its prompt and seed (a contact sheet to scroll)."""
    records = sorted(records, key=lambda r: r["index"])
    cells = "".join(f'<figure><img src="{html.escape(r["file"])}" width="160"><figcaption>{r["index"]}: '
                    f'{html.escape(r["prompt"])} (seed {r["seed"]})</figcaption></figure>' for r in records)
    page = ("<!doctype html><meta charset=utf-8><title>fewstep batch</title><style>body{display:flex;"
            "flex-wrap:wrap;font:12px sans-serif}figure{width:170px}</style>" + cells)
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
