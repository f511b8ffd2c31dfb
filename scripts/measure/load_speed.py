"""Load time and peak memory: fewstep.load vs diffusers `from_pretrained` on the same folder.

The folder is an SD-Turbo-architecture diffusers pipeline (UNet 865.9M, VAE 83.7M, OpenCLIP-H text
encoder 340.4M parameters) with random fp32 weights in safetensors, made from the real configs in
../shared/data/configs/sd-turbo by `fewstep.bench.random_weights` (the folder `fewstep bench --random-weights
sd-turbo` uses). Every load runs in a fresh Python process, fewstep and diffusers
alternating, after one warm-up each (warm page cache); the time is that of the load call alone
(imports excluded), peak RSS is the process's maximum. Prints a Markdown table row set.

    python scripts/measure/load_speed.py [--runs 3] [--work-dir ~/.cache/fewstep/random]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
which, folder = sys.argv[1], sys.argv[2]
if which == "fewstep":
    import fewstep
    t = time.perf_counter(); pipe = fewstep.load(folder); dt = time.perf_counter() - t
    n = sum(p.numel() for m in [pipe.unet, pipe.vae, *pipe.text_encoders] for p in m.parameters())
else:
    import diffusers
    t = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    dt = time.perf_counter() - t
    n = sum(p.numel() for m in [pipe.unet, pipe.vae, pipe.text_encoder] for p in m.parameters())
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": n}))
"""


def run_once(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the random-weight folder is kept "
                    "(default: ~/.cache/fewstep/random)")
    a = ap.parse_args()
    from fewstep.bench.random_weights import random_folder
    print("random-weight SD-Turbo folder (written on first use) ...", file=sys.stderr)
    a.folder = random_folder("sd-turbo", a.work_dir)
    results = {"fewstep": [], "diffusers": []}
    for which in results:  # warm-up: page cache and first-import costs
        run_once(which, a.folder)
    for _ in range(a.runs):
        for which in results:
            results[which].append(run_once(which, a.folder))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")} for w, rs in results.items()}
    assert results["fewstep"][0]["params"] == results["diffusers"][0]["params"]
    print(f"parameters: {results['fewstep'][0]['params']:,}; runs: {a.runs} (median)")
    print("| stack | load s (median) | all runs s | peak RSS MB (median) |")
    print("| --- | --- | --- | --- |")
    for w, rs in results.items():
        runs = ", ".join(f"{r['seconds']:.3f}" for r in rs)
        print(f"| {w} | {med[w]['seconds']:.3f} | {runs} | {med[w]['peak_rss_mb']:.0f} |")
    print(f"\nfewstep / diffusers load time: {med['fewstep']['seconds'] / med['diffusers']['seconds']:.3f} "
          f"({med['diffusers']['seconds'] / med['fewstep']['seconds']:.1f}x faster); "
          f"peak RSS ratio {med['fewstep']['peak_rss_mb'] / med['diffusers']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
