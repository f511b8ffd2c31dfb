"""Wall time and peak memory of `fewstep inspect` on a large architecture, weights never allocated.

Runs `fewstep inspect sdxl-turbo --resolution 1024` (the full table: UNet, two text encoders, VAE) in a
fresh Python process each time, imports included, as a user would; peak RSS is the child's maximum
resident set (from wait4). The acceptance targets are under 10 s and under 1 GB on the 2-core CPU
machine. Prints one Markdown table.

    python scripts/measure/inspect_speed.py [--runs 3] [--model sdxl-turbo] [--resolution 1024] [--format table]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_SECONDS, TARGET_MB = 10.0, 1024.0


def run_once(argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, bytes written to stdout) of one child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "fewstep.cli", *argv], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # wait4 reports this child's own peak RSS
        seconds = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"fewstep {' '.join(argv)} failed: {err.read().decode().strip()}")
        return seconds, usage.ru_maxrss / 1024, out.tell()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default="sdxl-turbo")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--format", default="table")
    a = p.parse_args()
    argv = ["inspect", a.model, "--resolution", str(a.resolution), "--format", a.format]
    results = [run_once(argv) for _ in range(a.runs)]
    seconds = [r[0] for r in results]
    peak = max(r[1] for r in results)
    print("| command | runs | median s | min s | max s | peak RSS MB | output KB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fewstep {' '.join(argv)} | {a.runs} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | "
          f"{max(seconds):.2f} | {peak:.0f} | {results[0][2] / 1024:.0f} |")
    ok = max(seconds) < TARGET_SECONDS and peak < TARGET_MB
    print(f"\ntarget: under {TARGET_SECONDS:.0f} s and {TARGET_MB:.0f} MB -> {'met' if ok else 'NOT met'} "
          f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
