"""How much fewstep's approximate CPU options change the image, apart from the decoder: PSNR of each
option set against fp32 with the same (TAESD) decoder, SD-Turbo architecture with random weights,
512x512, 1 step, same prompt and latents.

Row (c) of docs/BENCHMARKS.md reports the PSNR against the fp32 *full-VAE* image, which with random
weights mostly measures how far TAESD is from a random VAE (about 8 dB whatever the UNet does);
this isolates what int8 and ToDo do to the UNet's (and text encoder's) output.

    python scripts/measure/approx_psnr.py [--taesd ../shared/data/taesd] [--variants "OPTS;OPTS"]

Each variant is a `;`-separated entry of space-separated `fewstep.load` / `quantize` choices:
`int8` (int8-cpu on UNet, text encoder and decoder), `todo2` (token_downsample=2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fewstep.bench.random_weights import shared_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd-turbo")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--taesd", type=Path, default=shared_data() / "taesd")
    ap.add_argument("--variants", default="int8;todo2;int8 todo2")
    a = ap.parse_args()
    import numpy as np
    import torch

    import fewstep
    from fewstep.bench.harness import PROMPT, psnr
    from fewstep.bench.random_weights import random_folder
    from fewstep.bench.report import environment
    from fewstep.speed.quantize import quantize
    torch.set_grad_enabled(False)
    folder = random_folder(a.arch)
    side = a.resolution // 8
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))

    def image(opts: set[str]) -> np.ndarray:
        pipe = fewstep.load(folder, decoder=a.taesd, token_downsample=2 if "todo2" in opts else None)
        if "int8" in opts:
            quantize(pipe, "int8-cpu", ("unet", "text", "decoder"))
        x = pipe(PROMPT, steps=1, guidance=0.0, latents=latents, width=a.resolution, height=a.resolution,
                 progress=False, output_type="pt")
        return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    env = environment("cpu", torch.get_num_threads())
    print(f"- Date: {env['date']}. Commit: {env['commit']}. Device: {env['device']}, torch {env['torch']}.\n"
          f"- Command: `python scripts/measure/approx_psnr.py {shlex.join(sys.argv[1:])}`\n")
    base = image(set())
    print("| options (TAESD decoder in both) | PSNR vs fp32 dB |\n| --- | --- |")
    for variant in filter(None, a.variants.split(";")):
        opts = set(variant.split())
        if opts - {"int8", "todo2"}:
            raise SystemExit(f"unknown option in {variant!r}: use int8, todo2")
        print(f"| {' + '.join(sorted(opts))} | {psnr(image(opts), base):.1f} |", flush=True)


if __name__ == "__main__":
    main()
