"""fewstep.speed.compile on a tiny SD 1.x pipeline (CPU): which modules get compiled, compiled images equal
eager ones (max |diff| <= 1e-4 on images in [-1, 1]), and a second process with the same cache_dir
hits inductor's FX-graph cache (the slow test: inductor's C++ compile of ~11 graphs)."""

import os
import shutil

import pytest
import torch

import fewstep
from fewstep.speed.compile import RECOMPILE_LIMIT, compile_pipeline, compile_timings, graphed, regions
from fewstep.speed.deepcache import DeepCache
from fewstep.errors import FewstepError
from helpers.env import SHARED, requires_shared, slow

pytestmark = requires_shared
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def folder(tiny_folders):
    """The shared tiny SD 1.x folder (compiling reads it, and writes only under tmp_path)."""
    return tiny_folders["sd1"]


@pytest.fixture(autouse=True)
def _restore(monkeypatch, tmp_path):
    """compile_pipeline sets process-wide state: the inductor cache dir and dynamo's recompile limit."""
    import torch._dynamo.config as dynamo_config
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs; and OpenMP threads stall when the machine is shared
    with dynamo_config.patch(recompile_limit=dynamo_config.recompile_limit):
        yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def compiled(module) -> list[str]:
    """Names of the submodules (or "" for the module itself) that `module.compile()` wrapped."""
    return [n for n, m in module.named_modules() if m._compiled_call_impl is not None]


def test_regional_compiles_each_repeated_block(folder, tmp_path):
    pipe = compile_pipeline(fewstep.load(folder), cache_dir=tmp_path / "cache", backend="aot_eager")
    unet, vae, clip = compiled(pipe.unet), compiled(pipe.vae), compiled(pipe.text_encoders[0])
    # UNet: 4 down + 2 mid + 6 up resnets, transformer blocks 2 down + 1 mid + 3 up
    assert sum(".resnets." in n for n in unet) == 12 and sum(".transformer_blocks." in n for n in unet) == 6
    assert len(unet) == 18
    # VAE (4 levels, 1 layer): encoder 4 + 2 mid resnets, decoder 8 + 2 mid, one mid attention each
    assert len(vae) == 18 and sum(".attentions." in n for n in vae) == 2
    assert clip == [f"text_model.encoder.layers.{i}" for i in range(5)]
    assert all(isinstance(pipe.unet.get_submodule(n), regions()) for n in unet)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache").resolve())
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


def test_tiny_decoder_is_compiled_too(folder, tmp_path):
    """With decoder="tiny" images are decoded by TAESD, so its blocks are compiled (as well as the
    VAE's, which still encodes)."""
    from fewstep.models.tae import Block
    pipe = compile_pipeline(fewstep.load(folder, decoder=SHARED / "taesd"), cache_dir=tmp_path, backend="aot_eager")
    blocks = [n for n, m in pipe.decoder.named_modules() if isinstance(m, Block)]
    # TAESD: encoder 1 + 3 x 3 blocks, decoder 3 x 3 + 1
    assert sum(n.startswith("decoder.") for n in blocks) == 10 and len(blocks) == 20
    assert compiled(pipe.decoder) == blocks
    assert len(compiled(pipe.vae)) == 18


def test_whole_unet(folder, tmp_path):
    pipe = compile_pipeline(fewstep.load(folder), regional=False, cache_dir=tmp_path, backend="aot_eager")
    assert compiled(pipe.unet) == [""]
    assert len(compiled(pipe.vae)) == 18


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_graph_modes_compile_whole_modules(folder, tmp_path, mode):
    """The CUDA-graph modes compile the UNet, the text encoder, each autoencoder's encoder and decoder
    whole (regional blocks sharing one graph overwrote each other's outputs on an H200), no block alone."""
    pipe = compile_pipeline(fewstep.load(folder, decoder=SHARED / "taesd"), mode=mode, cache_dir=tmp_path,
                            backend="aot_eager")
    whole = [pipe.unet, pipe.text_encoders[0], pipe.vae.encoder, pipe.vae.decoder, pipe.decoder.decoder]
    assert all(graphed(m) for m in whole)
    assert not graphed(pipe.vae) and not graphed(pipe.decoder) and not graphed(pipe.unet.conv_in)
    assert all(compiled(m) == [] for m in (pipe.unet, pipe.vae, pipe.decoder, pipe.text_encoders[0]))
    with pytest.raises(FewstepError, match="compile mode reduce-overhead captures CUDA graphs, which need whole "
                                           "modules: drop regional"):
        compile_pipeline(fewstep.load(folder), mode="reduce-overhead", regional=True, cache_dir=tmp_path)


@torch.no_grad()
def test_graphed_pipeline_equals_eager_and_hands_out_copies(folder, tmp_path):
    """Traced (aot_eager) whole modules give the eager images, at 3 steps with guidance; each call's
    outputs are tensors of their own (a CUDA graph's replay would overwrite its output buffers)."""
    pipe = fewstep.load(folder)
    kwargs = dict(steps=3, guidance=5.0, width=64, height=64, progress=False, output_type="pt")
    want = pipe(PROMPT, **kwargs)
    compile_pipeline(pipe, mode="reduce-overhead", cache_dir=tmp_path, backend="aot_eager")
    got = pipe(PROMPT, **kwargs)
    assert (got - want).abs().max().item() <= 1e-4


def static_outputs(gm, example_inputs):
    """A dynamo backend that, like a CUDA graph's replay, writes every call's outputs into the same
    tensors and returns those."""
    kept = []

    def run(*args):
        outs = gm(*args)
        if not kept:
            kept.extend(o.clone() for o in outs)
        for k, o in zip(kept, outs):
            k.copy_(o)
        return type(outs)(kept)
    return run


@torch.no_grad()
def test_graphed_module_hands_out_copies(folder):
    """Through a backend that reuses its output tensors (as CUDA-graph replays do), the first call's
    text embeddings survive the second call: compile_graphed clones what the graph hands out."""
    from fewstep.speed.compile import compile_graphed
    pipe = fewstep.load(folder)
    enc, tok = pipe.text_encoders[0], pipe.tokenizers[0]
    ids_a, ids_b = tok(["a red circle"]), tok(["a blue square at the top"])
    want_a = enc(ids_a).last_hidden_state
    compile_graphed(enc, backend=static_outputs)
    a = enc(ids_a)
    b = enc(ids_b)
    assert type(a).__name__ == "CLIPTextOutput"
    assert (a.last_hidden_state - want_a).abs().max().item() <= 1e-5
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() > 1e-2


def test_bad_mode(folder, tmp_path):
    with pytest.raises(FewstepError, match="unknown compile mode 'fast'; choose one of None, default, reduce-overhead"):
        compile_pipeline(fewstep.load(folder), mode="fast", cache_dir=tmp_path)


@torch.no_grad()
@pytest.mark.parametrize("regional", [True, pytest.param(False, marks=slow)])
def test_traced_pipeline_equals_eager(folder, tmp_path, regional):
    """backend="aot_eager" runs dynamo and AOTAutograd without generating kernels: it checks that the
    blocks trace without changing the maths, in seconds. Inductor's kernels: the slow test below.
    DeepCache's cached calls run the compiled blocks too (regional) or eager blocks (whole UNet)."""
    from torch._dynamo.utils import counters
    pipe = fewstep.load(folder)
    kwargs = dict(steps=3, guidance=5.0, width=64, height=64, progress=False, output_type="pt")
    want, want_cached = pipe(PROMPT, **kwargs), pipe(PROMPT, **kwargs, cache=DeepCache(2, 1))
    graphs = counters["stats"]["unique_graphs"]
    compile_pipeline(pipe, regional=regional, cache_dir=tmp_path, backend="aot_eager")
    got, got_cached = pipe(PROMPT, **kwargs), pipe(PROMPT, **kwargs, cache=DeepCache(2, 1))
    assert counters["stats"]["unique_graphs"] > graphs
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_cached - want_cached).abs().max().item() <= 1e-4
    assert (want_cached - want).abs().max().item() > 1e-3  # the cache did change the images


@slow
def test_inductor_warm_start_hits_the_cache(folder, tmp_path):
    """Three processes: cold (compiles, fills cache_dir), warm on the same cache_dir (every graph
    hits the FX-graph cache), and one on a fresh folder holding only the mega-cache file (hits too;
    on CPU it still rebuilds the C++ kernels, so its time is not asserted). Measured here on a
    shared 2-core machine: 15 graphs, compile 848 s cold, 52 s warm, 605 s from the mega-cache."""
    cold, warm = compile_timings(folder, cache_dir=tmp_path / "a", size=64, steps=1, processes=2, threads=1)
    assert cold["eager_diff"] <= 1e-4 and warm["eager_diff"] <= 1e-4
    assert cold["fxgraph_misses"] == cold["graphs"] > 0 and cold["fxgraph_hits"] == 0
    assert warm["fxgraph_hits"] == cold["fxgraph_misses"] and warm["fxgraph_misses"] == 0
    assert warm["compile_s"] < cold["compile_s"]
    assert len(list((tmp_path / "a" / "mega-cache").glob("*.bin"))) == 1  # the warm run compiled nothing new
    shutil.copytree(tmp_path / "a" / "mega-cache", tmp_path / "b" / "mega-cache")
    (moved,) = compile_timings(folder, cache_dir=tmp_path / "b", size=64, steps=1, processes=1, threads=1)
    assert moved["fxgraph_hits"] == cold["fxgraph_misses"] and moved["fxgraph_misses"] == 0
