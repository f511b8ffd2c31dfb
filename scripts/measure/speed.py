"""The speed table of docs/BENCHMARKS.md: fewstep vs diffusers end to end (text encode + sampling + decode,
no load) on the SD-Turbo architecture with random weights, 512x512, 1 step, batch 1.

Rows: (a) fp32, full VAE, both stacks; (b) bf16 + channels_last, both; (c) fewstep's fastest options
(default: tiny decoder + bf16 + channels_last + fused q/k/v) against diffusers' defaults (fp32, full
VAE), with the PSNR of fewstep's image against its own fp32 full-VAE image from the same latents.
Each row is one `fewstep bench ... --json` run (fewstep and diffusers each in fresh processes, same
thread count, median of --runs after --warmup); peak memory is each process's peak RSS. Prints
Markdown for docs/BENCHMARKS.md with device, date, commit and the commands.

    python scripts/measure/speed.py [--runs 3] [--arch sd-turbo] [--resolution 512] [--taesd ../shared/data/taesd]
                          [--fast "--dtype bf16 --channels-last --fuse-qkv"] [--rounds 1] [--device cpu]
                          [--rows abc] [--ladder "OPTIONS;OPTIONS;..."]

--ladder adds fewstep-only rows, one per `;`-separated option string (each with the tiny decoder),
to see each acceleration of row (c) on and off in one run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fewstep.bench.random_weights import shared_data

ROOT = Path(__file__).resolve().parents[2]
TAESD = shared_data() / "taesd"


def rows(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, extra `fewstep bench` arguments) per table row."""
    fast = shlex.split(a.fast) + ["--decoder", str(a.taesd) if a.taesd else "tiny"]
    every = {"a": ("(a) fp32, full VAE", ["--compare", "diffusers"]),
             "b": ("(b) bf16 + channels_last", ["--dtype", "bf16", "--channels-last", "--compare", "diffusers"]),
             "c": ("(c) fewstep fastest vs diffusers default", [*fast, "--compare", "diffusers-default"])}
    ladder = [(f"(c{i}) fewstep alone", [*shlex.split(opts), "--decoder", fast[-1]])
              for i, opts in enumerate(filter(None, (a.ladder or "").split(";")), 1)]
    return [every[r] for r in a.rows] + ladder


def bench(common: list[str], extra: list[str]) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = ["fewstep", "bench", *common, *extra]
        print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "fewstep.cli", *cmd[1:], "--json", str(out)], cwd=ROOT,
                              stdout=sys.stderr)  # its table is progress here; stdout is the Markdown alone
        if proc.returncode:
            raise SystemExit(f"failed: {shlex.join(cmd)}")
        return json.loads(out.read_text()), shlex.join(cmd)


def _f(x, digits: str = ".3g") -> str:
    if x is None:
        return "-"
    return "identical" if x == "inf" else format(x, digits)


def markdown(reports: list[tuple[str, dict, str]], a: argparse.Namespace) -> str:
    env = reports[0][1]["environment"]
    lines = [f"- Date: {env['date']}. Commit: {env['commit']}. Device: {a.device} ({env['device']}), "
             f"{env['threads']} torch threads. torch {env['torch']}, diffusers {env.get('diffusers')}.",
             f"- Command: `python scripts/measure/speed.py {shlex.join(sys.argv[1:])}`; its rows run:",
             *[f"  - {label}: `{cmd}`" for label, _, cmd in reports],
             f"- Setup: {a.arch} architecture, random weights, {a.resolution}x{a.resolution}, 1 step, batch 1, "
             f"guidance 0; median of {a.runs} runs after {a.warmup} warm-up, each stack in its own process.", "",
             "| row | stack | settings | end-to-end s (median) | min-max s | images/s | text encode s | step s "
             "| decode s | peak RSS MiB | PSNR vs fewstep fp32 full dB | e2e fewstep/diffusers |",
             "|" + " --- |" * 12]
    for label, report, _ in reports:
        for lib, r in report["results"].items():
            ratio = _f(report["ratios"].get("e2e_s")) if lib == "fewstep" else ""
            lines.append(f"| {label} | {lib} | {r['settings']} | {_f(r['e2e_s'])} | {_f(r['e2e_min_s'])}-"
                         f"{_f(r['e2e_max_s'])} | {_f(r['images_per_s'])} | {_f(r['encode_s'])} | {_f(r['step_s'])} "
                         f"| {_f(r['decode_s'])} | {_f(r['peak_memory_mb'], '.0f')} | {_f(r['psnr_db'], '.1f')} "
                         f"| {ratio} |")
    notes = sorted({n for _, report, _ in reports for n in report["notes"]})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd-turbo")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--taesd", type=Path, default=TAESD if TAESD.is_dir() else None,
                    help="TAESD folder for row (c) (default: $FEWSTEP_SHARED_DATA/taesd or ../shared/data/taesd, "
                    "else TAESD from the hub)")
    ap.add_argument("--fast", default="--dtype bf16 --channels-last --fuse-qkv",
                    help="fewstep bench options of row (c), besides --decoder")
    ap.add_argument("--work-dir", default=None, help="where the random-weight folder is kept")
    ap.add_argument("--rows", default="abc", help="which rows to run, e.g. 'ac' (a CPU without bf16 units)")
    ap.add_argument("--ladder", default=None, help="fewstep-only rows: ';'-separated option strings")
    a = ap.parse_args()
    if set(a.rows) - set("abc") or not (a.rows or a.ladder):
        ap.error(f"--rows {a.rows!r}: letters among a, b, c")
    common = ["--random-weights", a.arch, "--resolution", str(a.resolution), "--steps", "1", "--batch", "1",
              "--runs", str(a.runs), "--warmup", str(a.warmup), "--rounds", str(a.rounds), "--device", a.device]
    common += ["--work-dir", a.work_dir] if a.work_dir else []
    reports = [(label, *bench(common, extra)) for label, extra in rows(a)]
    print(markdown(reports, a))


if __name__ == "__main__":
    main()
