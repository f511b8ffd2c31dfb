"""`fewstep generate --from-file`: the options of a batch run and the run itself (docs/batch.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..errors import FewstepError
from .processes import device_for, processes
from .rows import read_rows
from .run import run_rows


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (or --from-file)")
    p.add_argument("--from-file", default=None, metavar="FILE", help="a prompt per line (.txt), per JSON row with "
                   "its own settings (.jsonl) or from a column of a .tsv (PartiPrompts): images, manifest.jsonl "
                   "and index.html into the --output folder; a re-run skips the images already made; under "
                   "`accelerate launch` the processes share the rows (docs/batch.md)")
    p.add_argument("--column", default=None, help="--from-file .tsv: the prompt column (default: Prompt)")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                   help="--from-file .tsv: keep the rows with this value (repeatable)")
    p.add_argument("--strict", action="store_true", help="--from-file: stop at a malformed row instead of "
                   "skipping it with a warning")


def batch_size(text: str | None) -> int | str | None:
    """--batch-size N or auto."""
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise FewstepError(f"--batch-size {text!r}: a whole number of at least 1, or auto")
    return int(text)


def generate_rows(a: argparse.Namespace, make_pipe) -> dict | None:
    """--from-file: the file's rows, each with the command line's settings unless the row sets its own;
    `make_pipe(a)` loads the model (on this process's GPU under several processes)."""
    if Path(a.output).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        raise FewstepError(f"--output {a.output}: --from-file writes a folder of images, not one file")
    rows = read_rows(a.from_file, a.column, a.filter)
    given = {"negative_prompt": a.negative_prompt, "steps": a.steps, "guidance": a.guidance, "sampler": a.sampler,
             "width": a.width, "height": a.height}
    rows = [replace(r, settings={**{k: v for k, v in given.items() if v is not None}, **r.settings}) for r in rows]
    procs = processes(a.device)
    pipe = make_pipe(replace_device(a, device_for(a.device, procs)))
    report = run_rows(pipe, rows, a.output, a.seed, batch_size(a.batch_size) or 1, progress=not a.quiet,
                      strict=a.strict, procs=procs)
    return report if procs.main else None  # one summary, from the first process


def replace_device(a: argparse.Namespace, device: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "device": device})


def summary(report: dict, output: str) -> str:
    bad = f", {report['bad_rows']} malformed rows skipped" if report["bad_rows"] else ""
    procs = f" on {report['processes']} processes" if report["processes"] > 1 else ""
    return (f"{report['images']} images made, {report['skipped']} already there{bad}, in {output}{procs}: "
            f"{report['images_per_s']} images/s, {report['s_per_image']} s/image, peak memory "
            f"{report['peak_memory_mib']} MiB")
