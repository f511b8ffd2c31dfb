"""Speed options (fewstep.speed.accel) keep the numbers: channels-last and fused projections match the
default to fp32 rounding, the tiny decoder is TAESD's own output, bf16/fp16 pipelines stay close to
fp32 with the VAE kept in fp32 once, and the `cache` hook sees every model evaluation.

Tolerances: layout and fusion <= 1e-5 relative (max abs difference over max abs value) on images
in [-1, 1]; bf16 vs fp32 mean abs <= 0.05 on images in [-1, 1].
"""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import fewstep
import fewstep.imaging
import fewstep.loading.dtypes
from fewstep.speed.accel import fuse_attention, optimize, preview_callback
from fewstep.errors import FewstepError
from fewstep.models.layers import Attention
from fewstep.loading.folders import load_taesd
from helpers.env import requires_shared
from helpers.taesd import TAESD, diffusers_with_original_weights

pytestmark = requires_shared

PROMPT = "a red circle on the left"
GEN = dict(steps=2, guidance=5.0, width=64, height=64, seed=3, progress=False, output_type="pt")



@pytest.fixture(scope="module")
def taesd_dirs(tmp_path_factory):
    """Each TAESD in its own folder: original files, and the diffusers AutoencoderTiny layout."""
    root = tmp_path_factory.mktemp("taesd")
    dirs = {}
    for prefix in ("taesd", "taesdxl"):
        (root / prefix).mkdir()
        for side in ("encoder", "decoder"):
            shutil.copy(TAESD / f"{prefix}_{side}.safetensors", root / prefix)
        diffusers_with_original_weights(prefix).save_pretrained(root / f"{prefix}-diffusers")
        dirs[prefix], dirs[prefix + "-diffusers"] = root / prefix, root / f"{prefix}-diffusers"
    return dirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_channels_last_same_images(tiny_folders, family):
    ref = fewstep.load(tiny_folders[family])(PROMPT, **GEN)
    pipe = fewstep.load(tiny_folders[family], channels_last=True)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = pipe(PROMPT, **GEN)
    assert out.is_contiguous() and ref.std() > 0.05
    assert rel(out, ref) <= 1e-5


def owns_its_memory(t: torch.Tensor) -> bool:
    """`t` is not a view into a larger (memory-mapped file) storage."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_cpu_autoencoder_is_channels_last_and_owns_its_memory(tiny_folders, taesd_dirs):
    pipe = fewstep.load(tiny_folders["sd1"])  # channels_last not asked for: only the autoencoder
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    convs = [m.weight for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert all(owns_its_memory(t) for t in [*pipe.vae.parameters(), *pipe.vae.buffers()])
    tiny = fewstep.load(tiny_folders["sd1"], decoder=taesd_dirs["taesd"])
    assert tiny.decoder.decoder.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not tiny.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # left as loaded
    assert rel(tiny(PROMPT, **GEN), pipe(PROMPT, **GEN)) > 0.05
    optimize(tiny, decoder="full")  # switching back converts the full VAE then
    assert tiny.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(owns_its_memory(p) for p in tiny.vae.parameters())
    assert rel(tiny(PROMPT, **GEN), pipe(PROMPT, **GEN)) <= 1e-6


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fused_projections_same_images(tiny_folders, family):
    ref = fewstep.load(tiny_folders[family])
    pipe = fewstep.load(tiny_folders[family], fuse_qkv=True)
    keys = pipe.unet.state_dict().keys()
    n_blocks = sum(k.endswith("attn1.to_qkv.weight") for k in keys)
    assert n_blocks > 0 and n_blocks == sum(k.endswith("attn2.to_kv.weight") for k in keys)
    assert not any(k.endswith(("to_k.weight", "to_v.weight", "attn1.to_q.weight")) for k in keys)
    assert n_blocks == sum(k.endswith("attn1.to_q.weight") for k in ref.unet.state_dict())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pipe.unet) == count(ref.unet)
    assert rel(pipe(PROMPT, **GEN), ref(PROMPT, **GEN)) <= 1e-5


def test_fused_attention_module_both_kinds():
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 7, 24)
    for context_dim, context in ((32, None), (24, ctx)):  # self-attention; cross (also SDXS only_cross attn1)
        a = Attention(32, context_dim, heads=4).eval()
        ref = a(x, context)
        a.fuse_projections(self_attention=context is None)
        assert (a.to_qkv is not None) == (context is None) and a.to_k is None
        assert rel(a(x, context), ref) <= 1e-6
    a = Attention(32, 32, heads=4)
    a.fuse_projections(self_attention=True)
    with pytest.raises(RuntimeError, match="given a context"):
        a(x, torch.randn(2, 7, 32))


def test_fuse_only_cross_block():
    from fewstep.configs import UNetConfig
    from fewstep.models.unet import UNet
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), norm_num_groups=8, cross_attention_dim=24,
                     num_heads=(2, 4), transformer_depth=(1, 1), down_attention=(False, True),
                     up_attention=(True, False), only_cross_attention=(False, True), sample_size=8)
    unet = UNet(cfg).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24)
    with torch.no_grad():
        ref = unet(x, torch.tensor(10.0), ctx)
        fuse_attention(unet)
        out = unet(x, torch.tensor(10.0), ctx)
    keys = unet.state_dict().keys()
    assert any(k.endswith("attn1.to_kv.weight") for k in keys)  # only_cross: attn1 attends to the text
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("layout", ["taesd", "taesd-diffusers"])
def test_tiny_decoder_from_folder(tiny_folders, taesd_dirs, layout):
    full = fewstep.load(tiny_folders["sd1"])
    pipe = fewstep.load(tiny_folders["sd1"], decoder=taesd_dirs[layout], channels_last=True)
    tae = load_taesd(TAESD / "taesd_encoder.safetensors", TAESD / "taesd_decoder.safetensors")
    z = pipe(PROMPT, **{**GEN, "output_type": "latent"})
    with torch.no_grad():
        want = tae.decode(z)
    img = pipe(PROMPT, **GEN)
    assert img.shape == (1, 3, 64, 64) and rel(img, want) <= 1e-5
    assert rel(img, full(PROMPT, **GEN)) > 0.05, "the tiny decoder is not the VAE"
    optimize(pipe, decoder="full")
    assert pipe.decoder is None and rel(pipe(PROMPT, **GEN), full(PROMPT, **GEN)) <= 1e-5


@pytest.mark.parametrize("family,repo,prefix", [("sd1", "madebyollin/taesd", "taesd"),
                                                ("sdxl", "madebyollin/taesdxl", "taesdxl")])
def test_tiny_decoder_from_hub(tiny_folders, taesd_dirs, monkeypatch, family, repo, prefix):
    import fewstep.speed.accel
    asked = []
    monkeypatch.setattr(fewstep.speed.accel, "download",
                        lambda r, v, patterns: asked.append((r, patterns)) or taesd_dirs[prefix + "-diffusers"])
    pipe = fewstep.load(tiny_folders[family], decoder="tiny")
    assert asked == [(repo, ["config.json", "diffusion_pytorch_model.safetensors"])]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = load_taesd(decoder_path=TAESD / f"{prefix}_decoder.safetensors").decode(z)
    assert rel(pipe.decode(z), want) <= 1e-5
    monkeypatch.setattr(fewstep.loading.dtypes, "native_bf16", lambda device: True)  # a CPU with bf16 units
    half = fewstep.load(tiny_folders[family], decoder="tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in half.decoder.parameters()} == {torch.bfloat16}
    assert (half.decode(z).float() - want).abs().mean() <= 0.05


def test_tiny_decoder_offline_and_bad_values(tiny_folders, monkeypatch, tmp_path):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    pipe = fewstep.load(tiny_folders["sd1"])
    for decoder, match in (("tiny", "needs madebyollin/taesd, which is not in the Hugging Face cache.*pass decoder="),
                           ("nobody/no-tae", "needs nobody/no-tae"), ("tiniest", "expected 'tiny', 'full'")):
        with pytest.raises(FewstepError, match=match) as e:
            optimize(pipe, decoder=decoder)
        assert "\n" not in str(e.value)
    pipe.vae.cfg = dataclasses.replace(pipe.vae.cfg, scaling_factor=0.5)
    with pytest.raises(FewstepError, match="scaling_factor=0.5"):
        optimize(pipe, decoder="tiny")


def test_preview_callback_shows_every_step(tiny_folders, taesd_dirs):
    pipe = fewstep.load(tiny_folders["sd1"])
    tae = fewstep.load_autoencoder(taesd_dirs["taesd"])
    seen = []
    kw = {**GEN, "steps": 3, "num_images": 2, "output_type": "latent", "sampler": "euler"}
    z = pipe(PROMPT, callback=preview_callback(tae, lambda i, im: seen.append((i, im))), **kw)
    assert [i for i, _ in seen] == [0, 1, 2] and all(im.size == (128, 64) for _, im in seen)
    with torch.no_grad():
        final = fewstep.imaging.to_pil(tae.decode(z))  # Euler's last x0 estimate is the result
    last = np.asarray(seen[-1][1], dtype=np.int16)
    assert np.abs(last - np.concatenate([np.asarray(im, dtype=np.int16) for im in final], axis=1)).max() <= 1
    assert np.abs(np.asarray(seen[0][1], dtype=np.int16) - last).mean() > 1, "previews do not change"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bf16_close_to_fp32(tiny_folders, taesd_dirs, family, monkeypatch):
    monkeypatch.setattr(fewstep.loading.dtypes, "native_bf16", lambda device: True)  # a CPU with bf16 units
    ref = fewstep.load(tiny_folders[family])
    pipe = fewstep.load(tiny_folders[family], dtype=torch.bfloat16)
    for m in (pipe.unet, pipe.vae, *pipe.text_encoders):  # bf16 has fp32's range: no VAE upcast (as diffusers)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    out, want = pipe(PROMPT, **GEN), ref(PROMPT, **GEN)
    assert torch.isfinite(out).all() and (out.float() - want).abs().mean() <= 0.05
    optimize(pipe, decoder=taesd_dirs["taesd"], channels_last=True, fuse_qkv=True)
    optimize(ref, decoder=taesd_dirs["taesd"])
    assert next(pipe.decoder.parameters()).dtype == torch.bfloat16
    assert (pipe(PROMPT, **GEN).float() - ref(PROMPT, **GEN)).abs().mean() <= 0.05


@pytest.mark.parametrize("decoder", [None, "taesd"])
def test_bf16_without_bf16_hardware_keeps_the_autoencoder_fp32(tiny_folders, taesd_dirs, monkeypatch, decoder):
    from fewstep.loading.dtypes import native_bf16
    assert native_bf16("cpu") == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert native_bf16("cuda") and native_bf16(torch.device("cuda", 0))
    monkeypatch.setattr(fewstep.loading.dtypes, "native_bf16", lambda device: False)
    ref = fewstep.load(tiny_folders["sd1"], decoder=decoder and taesd_dirs[decoder])
    pipe = fewstep.load(tiny_folders["sd1"], dtype=torch.bfloat16, decoder=decoder and taesd_dirs[decoder])
    ae = pipe.vae if decoder is None else pipe.decoder
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ae.parameters()} == {torch.float32}
    z = torch.randn(1, 4, 8, 8)
    assert rel(pipe.decode(z), ref.decode(z)) <= 1e-6  # the very weights, not bf16-rounded ones
    assert pipe(PROMPT, **GEN).dtype == torch.float32


def test_fp16_keeps_upcast_vae_in_fp32_once(tiny_folders, monkeypatch, tmp_path):
    pipe = fewstep.load(tiny_folders["sd1"], dtype=torch.float16)
    assert pipe.unet.conv_in.weight.dtype == torch.float16 and pipe.vae.cfg.force_upcast
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    monkeypatch.setattr(fewstep.imaging, "_decode_as", None)  # no per-call conversion on the normal path
    out = pipe(PROMPT, **GEN)
    assert out.dtype == torch.float32 and (out - fewstep.load(tiny_folders["sd1"])(PROMPT, **GEN)).abs().mean() <= 0.05
    folder = tmp_path / "fp16-fix"
    shutil.copytree(tiny_folders["sd1"], folder)
    cfg = folder / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace('"force_upcast": true', '"force_upcast": false'))
    vae = fewstep.load(folder, dtype=torch.float16).vae
    assert not vae.cfg.force_upcast and {p.dtype for p in vae.parameters()} == {torch.float16}


def test_fp16_single_file_keeps_vae_in_fp32(tiny_folders, tmp_path):
    from helpers.ldm import save_original
    path = tmp_path / "sd1.safetensors"
    save_original(tiny_folders["sd1"], path, "sd1")
    pipe = fewstep.load(path, config=tiny_folders["sd1"], dtype=torch.float16)
    assert pipe.unet.conv_in.weight.dtype == torch.float16 and pipe.vae.decoder.conv_in.weight.dtype == torch.float32


def test_vae_dtype_rules():
    """fp16: a force_upcast VAE stays fp32 on a CPU (no fast fp16 convolutions) and for SDXL (as diffusers),
    and is fp16 for SD 1.x/2.x on a GPU (as diffusers' SD pipeline); a VAE without the flag follows."""
    from fewstep.configs import VAEConfig
    from fewstep.loading.dtypes import vae_dtype
    upcast, plain, f16, f32 = VAEConfig(force_upcast=True), VAEConfig(force_upcast=False), torch.float16, torch.float32
    assert vae_dtype(upcast, f16, "cuda") == f16 and vae_dtype(upcast, f16, "cuda:1", sdxl=False) == f16
    assert vae_dtype(upcast, f16, "cuda", sdxl=True) == f32
    assert vae_dtype(upcast, f16, "cpu") == f32 and vae_dtype(upcast, f16, "cpu", sdxl=True) == f32
    assert vae_dtype(plain, f16, "cpu") == f16 and vae_dtype(plain, f16, "cuda", sdxl=True) == f16
    assert vae_dtype(upcast, torch.bfloat16, "cuda", sdxl=True) == torch.bfloat16
    assert vae_dtype(upcast, f32, "cuda") == f32


def test_nan_in_fp32_decode_is_an_error(tiny_folders):
    from fewstep.imaging import safe_decode
    ae = fewstep.load_autoencoder(tiny_folders["sd1"])
    with torch.no_grad():
        ae.post_quant_conv.bias.fill_(float("nan"))
    with pytest.raises(FewstepError, match="NaN/inf in fp32"):
        safe_decode(ae, torch.randn(1, 4, 8, 8))


class CountingCache:
    """The smallest `cache`: counts wraps and calls, and passes everything through."""

    def __init__(self):
        self.wraps = self.calls = 0

    def wrap(self, unet):
        self.wraps += 1

        def f(x, t, **cond):
            self.calls += 1
            return unet(x, t, **cond)
        return f


@pytest.mark.parametrize("sampler,steps,evals", [("euler", 3, 3), ("heun", 3, 5)])
def test_cache_hook_sees_every_model_evaluation(tiny_folders, sampler, steps, evals):
    pipe = fewstep.load(tiny_folders["sd1"])
    cache = CountingCache()
    kw = {**GEN, "sampler": sampler, "steps": steps}
    out = pipe(PROMPT, cache=cache, **kw)
    assert (cache.wraps, cache.calls) == (1, evals)  # CFG halves share one batched call
    assert torch.equal(out, pipe(PROMPT, **kw))
    pipe(PROMPT, cache=cache, **kw)
    assert (cache.wraps, cache.calls) == (2, 2 * evals)  # wrapped afresh for every generation
