"""torch.compile for a Pipeline: regional by default, with a persistent on-disk compile cache.

Regional compilation follows the PyTorch recipe (docs.pytorch.org/tutorials/recipes/
regional_compilation.html) and diffusers' `compile_repeated_blocks`: instead of one graph for the
whole UNet, each repeated block (`module.compile()` on every UNet resnet and transformer block, VAE
resnet and attention, TAESD block, CLIP encoder layer) is compiled. Identical blocks share one
compiled graph (dynamo guards on shapes, not on module identity), so compile time is a handful of
small graphs rather than one huge one (the recipe reports close to whole-model speed-ups). Regional compilation
also keeps working under `fewstep.speed.deepcache.DeepCache`, which calls the UNet's blocks directly;
`regional=False` compiles the whole UNet as one graph (the VAE and text encoders stay regional). The
CUDA-graph modes ("reduce-overhead", "max-autotune") compile each module whole (`compile_graphed`).

Warm starts: inductor's FX-graph cache and AOTAutograd cache (switched on here in case the torch
version or the environment turned them off) are pointed at `cache_dir` through
TORCHINDUCTOR_CACHE_DIR, so a second process with the same `cache_dir` reuses the generated kernels
and pays only dynamo's tracing. `save_compile_cache`
also writes torch's portable "mega-cache" (`torch.compiler.save_cache_artifacts`, torch >= 2.7)
under `cache_dir`; `compile_pipeline` loads it back (`load_cache_artifacts`), so that folder alone
warm-starts a fresh machine (on GPU; on CPU the C++ kernels are rebuilt from it: copy the whole
cache_dir there). `compile_timings` measures cold vs warm in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import FewstepError
from ..pipeline import load_pipeline
from ..models.clip import CLIPEncoderLayer
from ..models.layers import ResnetBlock2D, VAEAttention
from ..models.tae import Block
from ..models.unet import BasicTransformerBlock
from .int8 import Int8Conv2d, Int8Linear

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that capture CUDA graphs (on a GPU). They compile whole modules, not regions: with regional
# compilation (blocks sharing one compiled function, each call a graph replay) the first H200 run failed
# in a CLIP encoder layer's residual add with "accessing tensor output of CUDAGraphs that has been
# overwritten by a subsequent run": a block's output was still in use when a later replay reused its
# memory (docs/BENCHMARKS.md "GPU").
GRAPH_MODES = ("reduce-overhead", "max-autotune")
MEGA_CACHE = "mega-cache"  # a folder of save_cache_artifacts() files
# Distinct (shape, attribute) variants of one block type: SD 1.x at 512 px with CFG has ~20 resnet
# variants across UNet and VAE; dynamo's default of 8 would leave the rest running eagerly.
RECOMPILE_LIMIT = 64


def default_cache_dir() -> Path:
    """TORCHINDUCTOR_CACHE_DIR if the user set it, else ~/.cache/fewstep/compile."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fewstep" / "compile"


def use_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Point inductor's persistent caches (process-wide) at cache_dir and load its mega-cache files."""
    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    import torch._functorch.config as aot_config  # lazy: torch's compiler stack, heavy to import
    import torch._inductor.config as inductor_config  # (as above)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at every cache lookup
    inductor_config.fx_graph_cache = True
    aot_config.enable_autograd_cache = True
    if hasattr(torch.compiler, "load_cache_artifacts"):
        for blob in sorted((path / MEGA_CACHE).glob("*.bin")):
            torch.compiler.load_cache_artifacts(blob.read_bytes())
    return path


def save_compile_cache(cache_dir: str | Path | None = None) -> Path | None:
    """After a compiling generation: write this process's compile artifacts (torch's mega-cache) as
    one file under cache_dir/mega-cache/, which `compile_pipeline` loads. That folder alone
    warm-starts another machine: Triton kernels travel as binaries, but CPU C++ kernels are rebuilt
    from the cached source. Returns the file, or None when this process compiled nothing new (all
    cache hits) or torch lacks the API (< 2.7)."""
    from torch._dynamo.utils import counters  # lazy: torch's compiler stack, heavy to import
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    if not counters["inductor"]["fxgraph_cache_miss"] and not counters["aot_autograd"]["autograd_cache_miss"]:
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not any(saved[1].artifacts.values()):
        return None
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / MEGA_CACHE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(saved[0]).hexdigest()[:16]}.bin"
    path.write_bytes(saved[0])
    return path


def regions() -> tuple[type, ...]:
    """The repeated block types that regional compilation compiles one by one."""
    return ResnetBlock2D, BasicTransformerBlock, VAEAttention, Block, CLIPEncoderLayer


def compile_regions(module: nn.Module, mode: str | None, fullgraph: bool, dynamic: bool | None,
                    backend: str) -> int:
    """`compile()` every repeated block inside module, in place; returns how many. Raises dynamo's
    per-function recompile limit to RECOMPILE_LIMIT (process-wide): each distinct shape of a block
    is one recompile of its forward, and past the limit dynamo silently runs the block eagerly."""
    import torch._dynamo.config as dynamo_config  # lazy: torch's compiler stack, heavy to import
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in module.modules() if isinstance(m, regions())]
    for block in blocks:
        block.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    return len(blocks)


def compile_graphed(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile `module` whole for a CUDA-graph mode, in place: its forward becomes the compiled one,
    called after `torch.compiler.cudagraph_mark_step_begin()` and with its output tensors cloned. Each
    call is then a step of its own and hands out tensors of its own (one copy of the output, tiny
    next to the module), so nothing outside the graph ever holds a buffer that the next replay
    overwrites: the sampler's history, the text embeddings kept across steps, the decoded image."""
    compiled = torch.compile(module.forward, **compile_kwargs)

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return _cloned(compiled(*args, **kwargs))

    forward.fewstep_graphed = True
    module.forward = forward
    return module


def graphed(module: nn.Module) -> bool:
    """Whether `compile_graphed` compiled this module."""
    return getattr(module.forward, "fewstep_graphed", False)


def _cloned(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple (CLIPTextOutput)
        return type(out)(*(_cloned(v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_cloned(v) for v in out)
    return out


def compile_pipeline(pipe, *, mode: str | None = None, regional: bool | None = None,
                     cache_dir: str | Path | None = None, fullgraph: bool = False, dynamic: bool | None = False,
                     backend: str = "inductor"):
    """Compile a Pipeline's UNet, VAE, tiny decoder (when set) and text encoders in place
    (compilation itself happens at the first generation); returns pipe.

    mode: torch.compile's mode; "reduce-overhead" adds CUDA graphs on a GPU, "max-autotune" also
    benchmarks kernel choices (slow to compile). regional: compile repeated blocks (fast to compile)
    or, with False, the whole UNet as one graph; default: regional, except in the CUDA-graph modes
    (GRAPH_MODES), which compile each module whole (UNet, text encoders, each autoencoder's encoder
    and decoder) through `compile_graphed` and cannot be regional. cache_dir: where compiled kernels
    persist between processes (default ~/.cache/fewstep/compile, or TORCHINDUCTOR_CACHE_DIR). dynamic=False compiles
    one static graph per distinct block shape (identical blocks share it; a new image size compiles
    again); True or None (torch's automatic) trade some kernel speed for fewer recompiles.
    backend: "inductor" generates kernels (a C++ compiler on CPU, Triton on GPU); "aot_eager" only
    traces (for debugging)."""
    if mode not in MODES:
        raise FewstepError(f"unknown compile mode {mode!r}; choose one of {', '.join(str(m) for m in MODES)}")
    modules = [m for m in (pipe.unet, pipe.vae, pipe.decoder, *pipe.text_encoders) if m is not None]
    if any(isinstance(layer, (Int8Conv2d, Int8Linear)) for m in modules for layer in m.modules()):
        # inductor lowers oneDNN int8 ops only with weight freezing, and compiling them took minutes here
        raise FewstepError("an int8-cpu quantized pipeline runs eagerly: quantize without compiling, or compile "
                           "without int8-cpu")
    if mode in GRAPH_MODES and regional:
        raise FewstepError(f"compile mode {mode} captures CUDA graphs, which need whole modules: drop regional "
                           "(blocks sharing one graph overwrite each other's outputs)")
    use_cache_dir(cache_dir)
    if mode in GRAPH_MODES:
        return _compile_whole(pipe, mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if regional is None or regional:
        compile_regions(pipe.unet, mode, fullgraph, dynamic, backend)
    else:
        pipe.unet.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    for module in (pipe.vae, pipe.decoder, *pipe.text_encoders):
        if module is not None:
            compile_regions(module, mode, fullgraph, dynamic, backend)
    return pipe


def _compile_whole(pipe, **compile_kwargs):
    """The CUDA-graph modes: UNet, text encoders, each autoencoder's encoder and decoder, each compiled whole."""
    for module in (pipe.unet, *pipe.text_encoders):
        compile_graphed(module, **compile_kwargs)
    for ae in (pipe.vae, pipe.decoder):
        for part in (getattr(ae, "encoder", None), getattr(ae, "decoder", None)):
            if part is not None:
                compile_graphed(part, **compile_kwargs)
    return pipe


def compile_timings(model: str | Path | None = None, *, cache_dir: str | Path, mode: str | None = None,
                    regional: bool | None = None, device: str = "cpu", dtype: str = "float32", size: int | None = None,
                    steps: int = 1, processes: int = 2, threads: int | None = None) -> list[dict]:
    """Cold vs warm compile, measured in `processes` fresh Python processes run one after another
    with the same cache_dir (pass an empty folder for a cold first run). Each process loads the
    model, generates once eagerly, compiles, and generates twice; it returns a dict: first_s
    (compile + one generation), steady_s (the second generation), compile_s = first_s - steady_s,
    eager_diff (max |compiled - eager| of the images in [-1, 1]), graphs (dynamo graphs built) and
    the inductor FX-graph / AOTAutograd cache hits and misses. threads: torch CPU threads in the
    processes (default torch's)."""
    args = dict(model=None if model is None else str(model), cache_dir=str(cache_dir), mode=mode,
                regional=regional, device=device, dtype=dtype, size=size, steps=steps, threads=threads)
    results = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, "-m", "fewstep.speed.compile", json.dumps(args)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compile timing process failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def _timing_run(model, cache_dir, mode, regional, device, dtype, size, steps, threads) -> dict:
    """One process of `compile_timings`."""
    from torch._dynamo.utils import counters  # lazy: torch's compiler stack, heavy to import
    if threads is not None:
        torch.set_num_threads(threads)
    pipe = load_pipeline(model, device=device, dtype=getattr(torch, dtype))

    def generate():
        start = time.perf_counter()
        out = pipe("a red circle", steps=steps, width=size, height=size, seed=0, progress=False, output_type="pt")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.float(), time.perf_counter() - start

    eager, _ = generate()
    compile_pipeline(pipe, mode=mode, regional=regional, cache_dir=cache_dir)
    (first, first_s), (_, steady_s) = generate(), generate()
    save_compile_cache(cache_dir)
    return dict(first_s=first_s, steady_s=steady_s, compile_s=first_s - steady_s,
                eager_diff=(first - eager).abs().max().item(), graphs=counters["stats"]["unique_graphs"],
                fxgraph_hits=counters["inductor"]["fxgraph_cache_hit"],
                fxgraph_misses=counters["inductor"]["fxgraph_cache_miss"],
                autograd_hits=counters["aot_autograd"]["autograd_cache_hit"],
                autograd_misses=counters["aot_autograd"]["autograd_cache_miss"])


if __name__ == "__main__":
    print(json.dumps(_timing_run(**json.loads(sys.argv[1]))))
