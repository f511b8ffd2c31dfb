"""Generate the rows not done yet, batch by batch, each image recorded in the manifest once written.

Batches are planned the same way whatever the number of processes (rows of the same settings, in file
order, `batch_size` at a time) and dealt out whole, so each image is the one a one-process run makes.
Each process appends to its own manifest part as images land (a killed run loses only what was in
flight); at the end the first process merges the parts into `manifest.jsonl` and writes the index.
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..outputs import save_image, writable
from ..request import resolve
from .manifest import append, done, file_name, merge_parts, part_path, sha256, write_index
from .processes import Processes
from .rows import Row
from .sizes import choose_batch_size


def run_rows(pipe, rows: list[Row], out: str | Path, seed: int = 0, batch_size: int | str = 1,
             progress: bool = True, strict: bool = False, procs: Processes = Processes()) -> dict:
    """Images for `rows` into `out`: row i's seed is its own or seed + i; rows with the same settings run
    `batch_size` at a time ("auto": the fastest size measured on the first batches). Malformed rows are
    skipped with a one-line warning each (`strict`: refused before any work). Returns counts, seconds,
    images/s, s/image and peak memory (summed / the largest over processes)."""
    out = Path(out)
    writable(out)
    rows, bad = usable(pipe, rows, strict)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        merge_parts(out)  # parts a killed run left behind
    procs.wait()
    finished = done(out)
    seeds = {r.index: int(r.settings.get("seed", seed + r.index)) for r in rows}
    todo = [r for r in rows if file_name(r, seeds[r.index]) not in finished]
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="images", disable=not (progress and procs.main), mininterval=2.0)
    new = _run(pipe, todo, seeds, out, batch_size, procs, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    made = procs.gather([len(new)])
    memory = procs.gather([peak_memory_mib(pipe)])
    procs.wait()
    if procs.main:
        records = merge_parts(out)
        write_index(out, records)
    made = sum(made)
    return {"images": made, "skipped": len(rows) - len(todo), "bad_rows": bad, "seconds": round(seconds, 2),
            "images_per_s": round(made / seconds, 3) if made else None,
            "s_per_image": round(seconds / made, 4) if made else None, "peak_memory_mib": max(memory),
            "processes": procs.count}


def usable(pipe, rows: list[Row], strict: bool) -> tuple[list[Row], int]:
    """The rows that can run, and how many could not: a row with a problem from its file, or settings
    the model refuses, is a one-line warning (or, `strict`, the error), checked before any work."""
    good = []
    for row in rows:
        problem = row.problem
        if problem is None:
            try:
                _request(pipe, [row], {row.index: 0})
            except FewstepError as e:
                problem = f"row {row.index} ({row.prompt[:40]!r}): {e}"
        if problem is None:
            good.append(row)
        elif strict:
            raise FewstepError(f"{problem} (--strict)")
        else:
            warnings.warn(f"{problem}; skipped")
    return good, len(rows) - len(good)


def plan(todo: list[Row], batch_size: int) -> list[list[Row]]:
    """Rows of the same settings together, in file order, `batch_size` at a time."""
    batches = []
    for _, same in groupby(sorted(todo, key=_settings_key), key=_settings_key):
        same = list(same)
        batches += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    return batches


def _settings_key(row: Row) -> str:
    return json.dumps({k: v for k, v in row.settings.items() if k != "seed"}, sort_keys=True)


def _run(pipe, todo, seeds, out, batch_size, procs: Processes, bar) -> list[dict]:
    part = part_path(out, procs)
    new = []
    if batch_size == "auto":  # each process measures on its own share of the rows
        mine = todo[procs.index::procs.count]
        group = max(plan(mine, max(1, len(mine))), key=len, default=[])
        size, new = choose_batch_size(lambda rows: _batch(pipe, rows, seeds, out, part), group, bar)
        done_now = {r["index"] for r in new}
        batches = plan([r for r in mine if r.index not in done_now], size)
    else:
        batches = plan(todo, int(batch_size))[procs.index::procs.count]
    for rows in batches:
        new += _batch(pipe, rows, seeds, out, part)
        bar.update(len(rows))
    return new


def _request(pipe, rows: list[Row], seeds: dict[int, int]):
    settings = {k: v for k, v in rows[0].settings.items() if k != "seed"}
    negative = settings.pop("negative_prompt", None)
    request = resolve(pipe.defaults, [r.prompt for r in rows], negative, **settings)
    return replace(request, seeds=tuple(seeds[r.index] for r in rows)), negative


def _batch(pipe, rows: list[Row], seeds: dict[int, int], out: Path, part: Path) -> list[dict]:
    """One model call for rows of the same settings; each image saved, then appended to the manifest
    part. Returns the images' manifest records."""
    request, negative = _request(pipe, rows, seeds)
    t0 = time.perf_counter()
    images = pipe.generate(request, progress=False)
    each = (time.perf_counter() - t0) / len(rows)
    records = []
    for row, image in zip(rows, images):
        try:
            path = save_image(image, out / file_name(row, seeds[row.index]))
        except OSError as e:
            raise FewstepError(f"cannot write {out / file_name(row, seeds[row.index])}: {e.strerror or e}; the "
                               "images already written are kept, run the same command again to finish") from None
        record = {"file": path.name, "index": row.index, "prompt": row.prompt, "seed": seeds[row.index],
                  "steps": request.steps, "guidance": request.guidance, "sampler": request.sampler,
                  "width": request.width, "height": request.height, "negative_prompt": negative,
                  "seconds": round(each, 4), "sha256": sha256(path), **({"meta": row.meta} if row.meta else {}),
                  **{k: row.settings[k] for k in ("image", "mask_image", "strength") if k in row.settings}}
        append(part, record)
        records.append(record)
    return records


def peak_memory_mib(pipe) -> float:
    """The run's peak memory: the GPU's allocated peak on CUDA, else the process's peak resident set."""
    if pipe.device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(pipe.device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB

