"""Load time and peak memory: fewstep.load vs diffusers `from_pretrained` on the same folder.

The folder is an SD-Turbo-architecture diffusers pipeline (UNet 865.9M, VAE 83.7M, OpenCLIP-H text
encoder 340.4M parameters) with random fp32 weights in safetensors, made from the real configs in
../shared/data/configs/sd-turbo. Every load runs in a fresh Python process, fewstep and diffusers
alternating, after one warm-up each (warm page cache); the time is that of the load call alone
(imports excluded), peak RSS is the process's maximum. Prints a Markdown table row set.

    python bench/load_speed.py [--runs 3] [--folder /tmp/fewstep-bench/sd-turbo-random]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs" / "sd-turbo"

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


def make_folder(folder: Path) -> None:
    """Write the random-weight SD-Turbo folder once (about 5.2 GB)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = folder.with_suffix(".part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SHARED, tmp, ignore=shutil.ignore_patterns("feature_extractor", "SOURCE.txt"))
    index = json.loads((tmp / "model_index.json").read_text())
    index.pop("feature_extractor", None)
    index["safety_checker"] = [None, None]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    g = torch.Generator().manual_seed(0)
    for name, cls, file in (("unet", UNet2DConditionModel, "diffusion_pytorch_model"),
                            ("vae", AutoencoderKL, "diffusion_pytorch_model"), ("text_encoder", None, "model")):
        with init_empty_weights():
            if cls is None:
                model = CLIPTextModel(CLIPTextConfig.from_pretrained(tmp / name))
            else:
                model = cls.from_config(cls.load_config(tmp / name))
        sd = {k: (torch.randn(v.shape, generator=g) * 0.02).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, tmp / name / f"{file}.safetensors")
    tmp.rename(folder)


def run_once(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{which} load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/fewstep-bench/sd-turbo-random"))
    a = ap.parse_args()
    if not (a.folder / "model_index.json").is_file():
        a.folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {a.folder} ...", file=sys.stderr)
        make_folder(a.folder)
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
