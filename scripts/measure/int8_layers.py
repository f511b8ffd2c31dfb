"""int8 vs fp32 per layer and for the whole SD-Turbo UNet on this CPU (`fewstep.speed.int8`, oneDNN kernels).

Layers: the convolution and Linear shapes of the SD UNet at 512x512 (and TAESD's 64-channel convs at
64-512 px), each timed as fp32 (channels-last) and as its int8 twin including the per-call activation
quantization; median of --runs after one warm-up. UNet: the random-weight SD-Turbo UNet
(`fewstep bench --random-weights sd-turbo` makes its folder), fp32 and int8-cpu copies run interleaved,
--rounds times, with the largest relative change of the output. Prints Markdown for docs/BENCHMARKS.md.

    python scripts/measure/int8_layers.py [--runs 7] [--rounds 3] [--no-unet]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


def median_ms(f, runs: int) -> float:
    f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def layers(runs: int) -> None:
    import torch

    from fewstep.speed.int8 import Int8Conv2d, Int8Linear
    cl = torch.channels_last
    print("| layer | input | fp32 ms | int8 ms | int8/fp32 |\n| --- | --- | --- | --- | --- |")
    for ci, co, side, k in [(320, 320, 64, 3), (320, 320, 64, 1), (640, 640, 32, 3), (1280, 1280, 16, 3),
                            (1280, 1280, 8, 3), (64, 64, 64, 3), (64, 64, 128, 3), (64, 64, 256, 3), (64, 64, 512, 3)]:
        conv = torch.nn.Conv2d(ci, co, k, padding=k // 2).to(memory_format=cl)
        x = torch.randn(1, ci, side, side).contiguous(memory_format=cl)
        a, b = median_ms(lambda: conv(x), runs), median_ms(lambda q=Int8Conv2d(conv): q(x), runs)
        print(f"| conv {k}x{k} {ci}->{co} | {side}x{side} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    for rows, ci, co in [(4096, 320, 320), (4096, 320, 2560), (4096, 1280, 320), (1024, 640, 640), (256, 1280, 1280),
                         (77, 1024, 1024), (77, 1024, 4096)]:
        lin = torch.nn.Linear(ci, co)
        x = torch.randn(1, rows, ci)
        a, b = median_ms(lambda: lin(x), runs), median_ms(lambda q=Int8Linear(lin): q(x), runs)
        print(f"| linear {ci}->{co} | {rows} rows | {a:.2f} | {b:.2f} | {b / a:.2f} |")


def unet(rounds: int) -> None:
    import torch

    from fewstep.bench.random_weights import random_folder
    from fewstep.speed.int8 import convert
    from fewstep.loading.folders import load_unet
    fp32 = load_unet(random_folder("sd-turbo") / "unet").eval().to(memory_format=torch.channels_last)
    int8 = copy.deepcopy(fp32)
    n = convert(int8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    t, context = torch.tensor([999]), torch.randn(1, 77, 1024, generator=g) * 0.5
    times = {"fp32": [], "int8": []}
    want, got = fp32(x, t, context), int8(x, t, context)  # also the warm-up
    for _ in range(rounds):
        for name, m in (("fp32", fp32), ("int8", int8)):
            s = time.perf_counter()
            m(x, t, context)
            times[name].append(time.perf_counter() - s)
    a, b = statistics.median(times["fp32"]), statistics.median(times["int8"])
    change = ((got - want).abs().max() / want.abs().max()).item()
    print(f"\nSD-Turbo UNet at 512 (random weights), {n} layers int8, {rounds} interleaved rounds: fp32 "
          f"{' / '.join(f'{v:.2f}' for v in times['fp32'])} s, int8 {' / '.join(f'{v:.2f}' for v in times['int8'])} s; "
          f"medians {a:.2f} -> {b:.2f} s = **{b / a:.2f}x**; max |int8 - fp32| / max |fp32| = {change:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-unet", action="store_true")
    a = ap.parse_args()
    import torch

    from fewstep.bench.report import environment
    torch.set_grad_enabled(False)
    env = environment("cpu", torch.get_num_threads())
    print(f"- Date: {env['date']}. Commit: {env['commit']}. Device: {env['device']}, {env['threads']} torch "
          f"threads, torch {env['torch']}.\n- Command: `python scripts/measure/int8_layers.py {' '.join(sys.argv[1:])}`\n")
    layers(a.runs)
    if not a.no_unet:
        unet(a.rounds)


if __name__ == "__main__":
    main()
