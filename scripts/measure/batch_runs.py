"""Throughput of `fewstep generate --from-file` with the built-in model: one image at a time (--batch-size 1)
against batches (8, and auto) and against two processes under `accelerate launch`, in the same run.

Each configuration is a fresh command over the same rows of PartiPrompts (or any prompt file) into a new
folder, --rounds times, interleaved so the machine's drift hits each alike; the figure is the median of
the images/s each command reports (generation only: process start and model load are not counted).
Prints a Markdown table with the ratios to one-at-a-time.

    python scripts/measure/batch_runs.py [--file ../shared/data/parti/PartiPrompts.tsv] [--rows 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fewstep.train.recipe import accelerate_launch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"batch 1 (one at a time)": (1, "1"), "batch 8": (1, "8"), "batch auto": (1, "auto"),
           "2 processes, batch 8": (2, "8")}  # processes, --batch-size


def rows_file(source: Path, rows: int, folder: Path) -> Path:
    """The first `rows` prompts of `source` (a .tsv's Prompt column, or a .txt) as a .txt file."""
    lines = source.read_text(encoding="utf-8").splitlines()
    prompts = [line.split("\t")[0] for line in lines[1:]] if source.suffix == ".tsv" else lines
    out = folder / "prompts.txt"
    out.write_text("\n".join([p for p in prompts if p.strip()][:rows]) + "\n", encoding="utf-8")
    return out


def images_per_s(processes: int, batch: str, prompts: Path, out: Path) -> float:
    launch = accelerate_launch(processes) if processes > 1 else [sys.executable]  # a free rendezvous port each time
    cmd = launch + ["-m", "fewstep.cli", "generate", "--from-file", str(prompts), "--output", str(out),
                    "--batch-size", batch, "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) images/s", done.stdout).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=str(ROOT.parent / "shared/data/parti/PartiPrompts.tsv"))
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    figures = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = rows_file(Path(a.file), a.rows, Path(tmp))
        for r in range(a.rounds):
            for i, (name, (processes, batch)) in enumerate(CONFIGS.items()):
                figures[name].append(images_per_s(processes, batch, prompts, Path(tmp) / f"run{r}-{i}"))
                print(f"round {r + 1}: {name}: {figures[name][-1]} images/s", file=sys.stderr, flush=True)
    base = statistics.median(figures["batch 1 (one at a time)"])
    print(f"| {a.rows} rows of {Path(a.file).name} | images/s (median of {a.rounds}) | vs one at a time | runs |")
    print("| --- | ---: | ---: | --- |")
    for name, values in figures.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.2f} | {m / base:.2f}x | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
