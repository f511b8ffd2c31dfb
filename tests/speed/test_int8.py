"""fewstep.speed.int8 (oneDNN int8 conv / linear, dynamic activations) and the "int8-cpu" quantization scheme.

Tolerances, as max |int8 - float| / max |float|: one int8 layer 2% (measured 0.8-1.1%; bf16 in and
out 3%, measured 0.7-1.2%), the tiny UNet 5% (measured 2.9%), the tiny pipeline's image with UNet,
text encoder and decoder in int8, 2 steps, 10% (measured 5.1%)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError
from fewstep.speed.int8 import Int8Conv2d, Int8Linear, convert, quantize_activation, quantize_weight, to_uint8
from fewstep.models.layers import Upsample2D
from fewstep.speed.quantize import quantize
from helpers.env import SHARED, requires_shared
from helpers.tiny import make_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
INT8 = (Int8Conv2d, Int8Linear)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_quantize_activation_round_trip():
    x = torch.randn(3, 40, 5, 5) * 3 + 1
    q, scale, zp = quantize_activation(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape and scale.dim() == zp.dim() == 0
    assert ((q.float() - zp) * scale - x).abs().max() <= scale / 2 + 1e-5  # half a step at most
    lo, hi = x.min().item(), x.max().item()
    assert scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert q.min() == 0 and q.max() == 255  # the range is used whole
    q, scale, zp = quantize_activation(x.clamp(min=0.5))  # all positive: the range is widened to 0,
    assert zp == 0 and ((q.float() - zp) * scale).min() >= 0  # so zero (padding) is exact


def test_to_uint8_is_the_formula():
    x = (torch.randn(2, 16, 9, 7) * 4).contiguous(memory_format=torch.channels_last)
    scale, zp = torch.tensor(0.05), torch.tensor(100)
    got = to_uint8(x, scale, zp)
    want = ((x / scale).round() + zp).clamp(0, 255).to(torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == x.shape and got.stride() == x.stride()
    assert got.untyped_storage().nbytes() == x.numel()  # a plain uint8 tensor of its own
    assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 0.01  # x * (1/s) vs x / s
    assert got.min() == 0 and got.max() == 255  # clamped at both ends


def test_quantize_weight_per_channel():
    w = torch.randn(6, 4, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (q.abs().amax((1, 2, 3)) == 127).all()  # each channel's largest weight maps to 127
    assert ((q.float() * scale.view(6, 1, 1, 1)) - w).abs().max() <= scale.max() / 2 + 1e-6


@torch.no_grad()
@pytest.mark.parametrize("stride,padding,bias,channels_last", [(1, 1, True, False), (2, 1, False, True),
                                                               (1, 0, True, True), (2, 0, True, False)])
def test_conv_matches_float(stride, padding, bias, channels_last):
    conv = torch.nn.Conv2d(24, 40, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, 24, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = conv(x)
    got = Int8Conv2d(conv)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert 0 < relative(got, want) <= 0.02


@torch.no_grad()
@pytest.mark.parametrize("stride,padding,relu", [(1, 1, False), (2, 1, True), (1, 0, True)])
def test_small_inputs_run_as_gemm(stride, padding, relu):
    """Inputs of at most GEMM_MAX_PIXELS pixels: im2col + int8 GEMM, the same integers as the conv kernel."""
    conv = torch.nn.Conv2d(24, 40, 3, stride=stride, padding=padding)
    x = torch.randn(2, 24, 7, 9)  # 63 pixels
    want = conv(x).relu() if relu else conv(x)
    gemm, direct = Int8Conv2d(conv, relu=relu), Int8Conv2d(conv, relu=relu)
    direct._pack(1000)
    got = gemm(x)
    assert gemm.gemm and not direct.gemm and gemm.qweight is None
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert 0 < relative(got, want) <= 0.02 and relative(got, direct(x)) <= 1e-6
    assert gemm(torch.randn(1, 24, 16, 16)).shape[-1] == (16 + 2 * padding - 3) // stride + 1  # packed once: still gemm


@torch.no_grad()
def test_linear_matches_float():
    lin = torch.nn.Linear(48, 20)
    x = torch.randn(2, 7, 48)
    want = lin(x)
    got = Int8Linear(lin)(x)
    assert got.shape == (2, 7, 20)
    assert 0 < relative(got, want) <= 0.02


@torch.no_grad()
def test_upsampler_runs_unfolded():
    """An int8 upsampler conv has no float weight to fold: `nearest_up_conv` has it enlarge its
    quantized input (same scale as the enlarged float input's: the very same result)."""
    up = Upsample2D(32)
    x = torch.randn(1, 32, 32, 32)  # 32x32: a float conv here would run folded
    want = up(x)
    q = up.conv = Int8Conv2d(up.conv)
    got = up(x)
    assert 0 < relative(got, want) <= 0.02
    assert torch.equal(got, q(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    assert torch.equal(up(x, size=(64, 64)), got) and up(x, size=(65, 63)).shape == (1, 32, 65, 63)


@torch.no_grad()
def test_convert_fuses_relu_into_the_conv():
    seq = torch.nn.Sequential(torch.nn.Conv2d(24, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 24, 10, 10)
    want = seq(x)
    assert convert(seq) == 3
    assert [type(m).__name__ for m in seq] == ["Int8Conv2d", "Identity", "Int8Conv2d", "Identity", "Int8Conv2d"]
    assert seq[0].relu and seq[2].relu and not seq[4].relu and "relu" in repr(seq[0])
    h = seq[0](x)
    assert (h >= 0).all() and (seq[4](h) < 0).any()
    assert 0 < relative(seq(x), want) <= 0.03


@requires_shared
@torch.no_grad()
def test_taesd_decoder_in_int8():
    """TAESD's decoder (real weights): 64-channel convs with fused ReLUs, int8 upsampling convs."""
    from fewstep.loading.folders import load_taesd
    tae = load_taesd(decoder_path=SHARED / "taesd" / "taesd_decoder.safetensors")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    want = tae.decode(z)
    assert convert(tae) == 33  # 30 block convs, 3 upsampling; the 4-channel first and 3-channel last stay float
    assert sum(isinstance(m, Int8Conv2d) and m.relu for m in tae.modules()) == 20  # two in each of the 10 blocks
    got = tae.decode(z)
    mse = ((got.clamp(-1, 1) - want.clamp(-1, 1)) / 2).pow(2).mean()  # images in [0, 1]
    assert 35 <= -10 * torch.log10(mse) < 60  # PSNR, measured 37.4 dB on these N(0, 1) latents


@torch.no_grad()
def test_unet_layers_and_output():
    unet = make_unet("sd")
    x, t, cond = unet_inputs(unet)
    want = unet(x, t, **cond)
    q = copy.deepcopy(unet)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    kept = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} | {
        n for n in layers if n.endswith("time_emb_proj")}  # 4 channels; the per-sample time Linears
    assert len(layers) == 201 and len(kept) == 21
    assert convert(q) == 180
    assert {n for n, m in q.named_modules() if isinstance(m, INT8)} == set(layers) - kept
    assert 0 < relative(q(x, t, **cond), want) <= 0.05


@torch.no_grad()
def test_pipeline_parts(tiny_folders):
    import fewstep
    pipe = fewstep.load(tiny_folders["sd1"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = pipe("a cat", steps=2, latents=latents, width=64, height=64, progress=False, output_type="pt")
    assert quantize(pipe, "int8-cpu", ("unet", "text", "decoder")) is pipe

    def count(m):
        return sum(isinstance(c, INT8) for c in m.modules())
    assert count(pipe.unet) > 0 and count(pipe.text_encoders[0]) > 0 and count(pipe.vae.decoder) > 0
    assert count(pipe.vae.encoder) == 0  # only the decoding half
    got = pipe("a cat", steps=2, latents=latents, width=64, height=64, progress=False, output_type="pt")
    assert 0 < relative(got, want) <= 0.10
    with pytest.raises(FewstepError, match="already quantized"):
        quantize(pipe, "int8-cpu")
    from fewstep.speed.compile import compile_pipeline
    with pytest.raises(FewstepError, match="int8-cpu quantized pipeline runs eagerly"):
        compile_pipeline(pipe)
    with pytest.raises(FewstepError, match="unknown part"):
        quantize(fewstep.load(tiny_folders["sd1"]), "int8-cpu", ("unet", "vae"))


def test_cpu_only():
    with torch.device("meta"):
        conv = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3))
    with pytest.raises(FewstepError, match="int8-cpu runs on the CPU .* the model is on meta"):
        quantize(conv, "int8-cpu")


@torch.no_grad()
def test_bf16_in_bf16_out():
    conv, lin = torch.nn.Conv2d(32, 32, 3, padding=1).bfloat16(), torch.nn.Linear(32, 24).bfloat16()
    x, y = torch.randn(1, 32, 8, 8).bfloat16(), torch.randn(2, 5, 32).bfloat16()
    for layer, q, inp in ((conv, Int8Conv2d(conv), x), (lin, Int8Linear(lin), y)):
        got, want = q(inp), layer(inp)
        assert got.dtype == torch.bfloat16 and 0 < relative(got.float(), want.float()) <= 0.03
