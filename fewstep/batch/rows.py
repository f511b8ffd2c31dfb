"""The rows of a prompt file: a prompt, the settings it overrides, and the table's other columns.

A malformed row (not JSON, an unknown key, no prompt) is kept with its problem, so the run can warn and
skip it (or stop, with --strict) while every other row keeps its place, its name and its seed."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewstepError

# JSONL keys a row may set (fewstep's argument names; "negative" and "cfg_scale" as aliases people use)
SETTINGS = ("negative_prompt", "seed", "steps", "guidance", "sampler", "width", "height", "image", "mask_image",
            "strength")
ALIASES = {"negative": "negative_prompt", "cfg_scale": "guidance", "mask": "mask_image",
           "denoising_strength": "strength"}
FILES = ("image", "mask_image")  # paths, relative to the prompt file's folder


@dataclass(frozen=True)
class Row:
    index: int  # the row's place in the file (after filtering): names its output, seeds it
    prompt: str
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # a .tsv row's other columns (PartiPrompts' Category, ...)
    problem: str | None = None  # why the row cannot run ("line 3: not JSON ..."), or None


def read_rows(path: str | Path, column: str | None = None, filters: list[str] = ()) -> list[Row]:
    """Rows of a .txt (one prompt per non-empty line), .jsonl ({"prompt": ..., settings}) or .tsv file
    (the prompt in `column`, default PartiPrompts' "Prompt"; `filters` like "Category=Animals")."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"--from-file {path}: no such file")
    kind = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FewstepError(f"--from-file {path}: not UTF-8 text (byte {e.start})") from None
    if kind == ".jsonl":
        rows = [_json_row(i, line, path) for i, line in enumerate(text.splitlines()) if line.strip()]
    elif kind == ".tsv":
        rows = _tsv_rows(text, path, column or "Prompt", filters)
    elif kind == ".txt":
        rows = [(line.strip(), {}, {}, None) for line in text.splitlines() if line.strip()]
    else:
        raise FewstepError(f"--from-file {path}: a .txt, .jsonl or .tsv file, not {kind or 'no suffix'}")
    if (filters or column) and kind != ".tsv":
        raise FewstepError("--column and --filter apply to .tsv files")
    if not rows:
        raise FewstepError(f"--from-file {path}: no prompts in it")
    return [Row(i, *row) for i, row in enumerate(rows)]


def _json_row(i: int, line: str, path: Path) -> tuple[str, dict, dict, str | None]:
    """(prompt, settings, meta, problem) of JSONL line i; "meta" may hold a row's own labels (a category)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        return "", {}, {}, f"{path} line {i + 1}: not JSON ({e.msg})"
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        return "", {}, {}, f"{path} line {i + 1}: not a JSON object with a \"prompt\" string"
    meta = data.pop("meta", {})
    settings = {ALIASES.get(k, k): v for k, v in data.items() if k != "prompt"}
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        return data["prompt"], {}, {}, (f"{path} line {i + 1}: unknown key {unknown[0]!r}; rows may set "
                                        f"{', '.join(SETTINGS)} and meta")
    if not isinstance(meta, dict):
        return data["prompt"], {}, {}, f"{path} line {i + 1}: \"meta\" is an object of labels"
    for key in FILES:
        if key in settings:
            if not isinstance(settings[key], str):
                return data["prompt"], {}, {}, f"{path} line {i + 1}: {key} is a file path"
            settings[key] = str((path.parent / settings[key]).resolve())
    return data["prompt"], settings, meta, None


def _tsv_rows(text: str, path: Path, column: str, filters) -> list[tuple[str, dict, dict, str | None]]:
    reader = csv.DictReader(text.splitlines(), delimiter="\t")
    names = reader.fieldnames or []
    for key in [column, *(f.partition("=")[0] for f in filters)]:
        if key not in names:
            raise FewstepError(f"{path}: no column {key!r} (columns: {', '.join(names) or 'none'})")
    for f in filters:
        if "=" not in f:
            raise FewstepError(f"--filter {f!r}: write COLUMN=VALUE")
    keep = dict(f.split("=", 1) for f in filters)
    rows = []
    for r in reader:
        if None in r.values() or None in r:  # fewer or more cells than the header has columns
            cells = len([v for k, v in r.items() if k is not None and v is not None]) + len(r.get(None, []))
            rows.append(("", {}, {}, f"{path} line {reader.line_num}: {cells} cells for {len(names)} columns"))
        elif all(r[k] == v for k, v in keep.items()):
            rows.append((r[column], {}, {k: v for k, v in r.items() if k != column}, None))
    return rows
