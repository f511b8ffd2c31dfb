"""A batch run's record: `manifest.jsonl` (one JSON line per image: settings, time, sha256) and `index.html`.

While a run works, each process appends to its own part (`manifest.part-N.jsonl`), a line per image
once the image is written whole; the first process merges the parts into the manifest (written to a
temporary file and renamed) at the end of a run, or at the start of the next one if the run was killed.
A line cut short by a kill or a full disk is ignored: its image is simply made again.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import tempfile
from pathlib import Path

from ..errors import FewstepError

MANIFEST = "manifest.jsonl"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_name(row, seed: int) -> str:
    return f"{row.index:05d}-{seed}.png"


def part_path(out: Path, procs) -> Path:
    return out / f"manifest.part-{procs.index}.jsonl"


def read_records(path: Path) -> list[dict]:
    """The whole JSON lines of a manifest or part (a line cut short is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records.append(record)
    return records


def _all_records(out: Path) -> list[dict]:
    """The manifest's records then the parts', the later record of a file replacing the earlier."""
    parts = sorted(out.glob("manifest.part-*.jsonl"))
    by_file = {r["file"]: r for path in [out / MANIFEST, *parts] for r in read_records(path)}
    return list(by_file.values())


def done(out: Path) -> dict[str, dict]:
    """The records whose file exists with the recorded hash (a re-run skips those rows)."""
    return {r["file"]: r for r in _all_records(out)
            if (out / r["file"]).is_file() and sha256(out / r["file"]) == r.get("sha256")}


def append(part: Path, record: dict) -> None:
    try:
        with part.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise FewstepError(f"cannot write {part}: {e.strerror or e}; the images already written are kept, run "
                           "the same command again to finish") from None


def merge_parts(out: Path) -> list[dict]:
    """Fold the parts into `manifest.jsonl` (atomically), remove them, and return the records of the
    images that are there, in row order."""
    parts = sorted(out.glob("manifest.part-*.jsonl"))
    records = sorted((r for r in _all_records(out) if (out / r["file"]).is_file()), key=lambda r: r.get("index", 0))
    if not parts:
        return records
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, out / MANIFEST)
    except OSError as e:
        os.unlink(tmp)
        raise FewstepError(f"cannot write {out / MANIFEST}: {e.strerror or e}; run the same command again") from None
    for part in parts:
        part.unlink()
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
