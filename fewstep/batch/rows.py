"""The rows of a prompt file: a prompt and the settings it overrides."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FewstepError

# JSONL keys a row may set (fewstep's argument names; "negative" and "cfg_scale" as aliases people use)
SETTINGS = ("negative_prompt", "seed", "steps", "guidance", "sampler", "width", "height")
ALIASES = {"negative": "negative_prompt", "cfg_scale": "guidance"}


@dataclass(frozen=True)
class Row:
    index: int  # the row's place in the file (after filtering): names its output, seeds it
    prompt: str
    settings: dict = field(default_factory=dict)


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
        rows = [(line.strip(), {}) for line in text.splitlines() if line.strip()]
    else:
        raise FewstepError(f"--from-file {path}: a .txt, .jsonl or .tsv file, not {kind or 'no suffix'}")
    if (filters or column) and kind != ".tsv":
        raise FewstepError("--column and --filter apply to .tsv files")
    if not rows:
        raise FewstepError(f"--from-file {path}: no prompts in it")
    return [Row(i, prompt, settings) for i, (prompt, settings) in enumerate(rows)]


def _json_row(i: int, line: str, path: Path) -> tuple[str, dict]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise FewstepError(f"{path} line {i + 1}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise FewstepError(f"{path} line {i + 1}: a JSON object with a \"prompt\" string")
    settings = {ALIASES.get(k, k): v for k, v in data.items() if k != "prompt"}
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise FewstepError(f"{path} line {i + 1}: unknown key {unknown[0]!r}; rows may set {', '.join(SETTINGS)}")
    return data["prompt"], settings


def _tsv_rows(text: str, path: Path, column: str, filters) -> list[tuple[str, dict]]:
    table = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    names = list(table[0]) if table else []
    for key in [column, *(f.partition("=")[0] for f in filters)]:
        if key not in names:
            raise FewstepError(f"{path}: no column {key!r} (columns: {', '.join(names) or 'none'})")
    for f in filters:
        if "=" not in f:
            raise FewstepError(f"--filter {f!r}: write COLUMN=VALUE")
    keep = dict(f.split("=", 1) for f in filters)
    return [(r[column], {}) for r in table if all(r[k] == v for k, v in keep.items())]
