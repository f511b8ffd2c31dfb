"""One benchmark measurement in a fresh process: `python -m fewstep.bench.child JOB_JSON` (see `fewstep.bench.harness`).

Loads one library's pipeline with the job's settings, generates `warmup` untimed and `runs` timed images
from fixed initial latents, and prints one JSON line: load time, per-run end-to-end times, per-run text
encode / per-step / decode times (from forward hooks on the text encoders and the VAE decoder, so the
parts come from the same runs as the totals), peak memory, and the compile overhead. On CUDA every
timestamp is taken after `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import importlib
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from .. import api
from ..errors import FewstepError
from ..imaging import to_uint8
from ..speed.accel import keep_memory
from ..speed.compile import compile_pipeline
from ..speed.deepcache import DeepCache
from ..speed.quantize import quantize
from ..version import __version__
from .harness import Job
from .reference import diffusers_runner
from .runner import DTYPES, Runner, initial_latents


class PartTimer:
    """Forward hooks that record when each text encoder and the VAE decoder run."""

    def __init__(self, encoders: list[torch.nn.Module], decoder: torch.nn.Module | None, sync: Callable):
        self.sync, self.events = sync, []  # (kind, start, end)
        for m in encoders:
            self._hook(m, "encode")
        if decoder is not None:
            self._hook(decoder, "decode")

    def _hook(self, module: torch.nn.Module, kind: str) -> None:
        start = []

        def pre(mod, args):
            self.sync()
            start.append(time.perf_counter())

        def post(mod, args, out):
            self.sync()
            self.events.append((kind, start.pop(), time.perf_counter()))
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def parts(self, steps: int) -> tuple[float | None, float | None, float | None]:
        """(text encode, time per step, decode) of the run since the last reset; None where a hook never ran."""
        enc = [e for e in self.events if e[0] == "encode"]
        dec = [e for e in self.events if e[0] == "decode"]
        encode = sum(e - s for _, s, e in enc) if enc else None
        decode = sum(e - s for _, s, e in dec) if dec else None
        step = (dec[0][1] - enc[-1][2]) / steps if enc and dec else None
        return encode, step, decode


def peak_memory(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"  # Linux: KiB


def measure(job: Job, runner: Runner) -> dict:
    """Warm up, then time `job.runs` images; the first call also pays for compilation."""
    s = job.settings
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    timer = PartTimer(runner.encoders, runner.decoder, sync)
    untimed = max(job.warmup, 1 if s.compile else 0)
    calls, image = [], None
    for i in range(untimed + job.runs):
        timer.events.clear()
        sync()
        t = time.perf_counter()
        out = runner.generate()
        sync()
        calls.append((time.perf_counter() - t, *timer.parts(s.steps)))
        if i == untimed:
            image = runner.to_uint8(out)
    timed = calls[untimed:]
    e2e = [c[0] for c in timed]
    memory, kind = peak_memory(s.device)
    if job.image:
        np.save(job.image, image)
    compile_s = runner.compile_s + calls[0][0] - statistics.median(e2e) if s.compile else None
    return {"load_s": runner.load_s, "first_s": calls[0][0], "compile_s": compile_s, "e2e": e2e,
            "encode": [c[1] for c in timed], "step": [c[2] for c in timed], "decode": [c[3] for c in timed],
            "peak_memory_mb": memory, "memory": kind, "versions": versions(job.library)}


def versions(library: str) -> dict:
    out = {"torch": torch.__version__, "fewstep": __version__}
    if library == "diffusers":
        import diffusers  # lazy: the test-only reference, in its own process only
        import transformers  # (as above)
        out.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    return out


def fewstep_runner(job: Job) -> Runner:
    """fewstep.load with the job's options (+ quantize), then compile_pipeline; generate() calls the pipeline.
    Every fewstep module is imported before the clock starts, as diffusers' are for its side."""
    s = job.settings
    if s.keep_memory:
        keep_memory()  # before loading: process-wide, as a user would set it at start
    if s.quantize:
        _preimport("torchao")  # the quantization backend: its import is not load time either
    t = time.perf_counter()
    pipe = api.load(job.folder, device=s.device, dtype=DTYPES[s.dtype], channels_last=s.channels_last,
                        fuse_qkv=s.fuse_qkv, decoder=s.decoder, token_downsample=s.token_downsample)
    if s.quantize:
        quantize(pipe, s.quantize, s.quantize_parts)
    load_s = time.perf_counter() - t
    compile_s = 0.0
    if s.compile:
        t = time.perf_counter()
        compile_pipeline(pipe, mode=s.compile_mode, cache_dir=job.compile_dir)
        compile_s = time.perf_counter() - t
    cache = None
    if s.cache:
        cache = DeepCache(s.cache[0]) if s.cache[1] is None else DeepCache(s.cache[0], s.cache[1])
    side = s.resolution // pipe.vae_scale
    latents = initial_latents(job.seed, (s.batch, pipe.unet.cfg.out_channels, side, side))
    prompts = [job.prompt] * s.batch

    def generate() -> torch.Tensor:
        return pipe(prompts, steps=s.steps, guidance=s.guidance, latents=latents, width=s.resolution,
                    height=s.resolution, progress=False, output_type="pt", cache=cache)

    decoding = pipe.vae if pipe.decoder is None else pipe.decoder  # what Pipeline.decode uses
    return Runner(generate, to_uint8, list(pipe.text_encoders), getattr(decoding, "decoder", None), load_s, compile_s)


def _preimport(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        pass  # the option itself then says what is missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = Job.from_json(argv[0])
    torch.set_num_threads(job.threads)
    torch.set_grad_enabled(False)
    try:
        if job.library == "fewstep":
            runner = fewstep_runner(job)
        else:
            runner = diffusers_runner(job)
        result = measure(job, runner)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
