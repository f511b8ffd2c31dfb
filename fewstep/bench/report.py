"""`fewstep bench` output: the machine description and a Markdown table with one column per library and
the ratio fewstep / diffusers (below 1 is faster or smaller for times and memory; above 1 is better
for images/s)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..version import __version__

ROWS = (  # (Result field, label)
    ("load_s", "load s"),
    ("encode_s", "text encode s"),
    ("step_s", "per step s (UNet + sampler)"),
    ("decode_s", "decode s"),
    ("e2e_s", "end-to-end s (median)"),
    ("e2e_range", "end-to-end min-max s"),
    ("e2e_iqr", "end-to-end IQR s"),
    ("images_per_s", "images/s"),
    ("peak_memory_mb", "peak memory MiB"),
    ("compile_cold_s", "compile cold s"),
    ("compile_warm_s", "compile warm s"),
    ("psnr_db", "PSNR vs fp32 full-VAE dB"),
)


def environment(device: str, threads: int) -> dict:
    """Where the numbers come from: device, software versions, thread count, date, commit."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_name() + f", {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "fewstep": __version__, "python": platform.python_version(),
            "threads": threads, "date": datetime.date.today().isoformat(), "commit": commit()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def commit() -> str | None:
    """The checkout's short commit, '+' when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+" if dirty else "")


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "identical"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _cell(result, name: str) -> str:
    if name == "e2e_range":
        return f"{_num(result.e2e_min_s)}-{_num(result.e2e_max_s)}"
    if name == "e2e_iqr":
        return f"{_num(result.e2e_q1_s)}-{_num(result.e2e_q3_s)}"
    return _num(getattr(result, name))


def table(report) -> str:
    """The report as a heading, the settings and a Markdown table."""
    s, o, env = report.settings, report.options, report.environment
    libs = list(report.results)
    lines = [f"fewstep bench: {report.model}, {s.resolution}x{s.resolution}, {s.steps} step{'s' * (s.steps > 1)}, "
             f"batch {s.batch}, guidance {s.guidance:g}, {s.device} ({env['device']}), {env['threads']} threads",
             f"{o.runs} timed runs after {o.warmup} warm-up per process, {o.rounds} process(es) per library; "
             f"torch {env['torch']}" + (f", diffusers {env['diffusers']}" if env.get("diffusers") else ""),
             *[f"{lib}: {r.settings}" for lib, r in report.results.items()],
             *report.notes, ""]
    head = ["measure", *libs] + (["fewstep/diffusers"] if report.ratios else [])
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, label in ROWS:
        cells = [_cell(report.results[lib], name) for lib in libs]
        if all(c == "-" for c in cells):
            continue
        if name == "peak_memory_mb":
            label = f"{label} ({report.results[libs[0]].memory})"
        if report.ratios:
            cells.append(_num(report.ratios.get(name)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
