"""int8 convolutions and linears on x86 CPUs, run by oneDNN's int8 kernels (VNNI, AMX).

A CPU without bf16 hardware still multiplies int8 at about four times its fp32 rate (AVX512-VNNI:
64 multiply-adds per instruction against 16): a 3x3 conv of SD's UNet runs 3-5x faster in int8
here. torchao's int8 configs quantize only `nn.Linear` weights, while two thirds of a UNet's FLOPs
and all of an autoencoder's are convolutions; PyTorch's own int8 conv path (torchao's pt2e
`X86InductorQuantizer`) needs `torch.export`, calibration data and a minutes-long compile. This
module calls the very kernels that path lowers to (`onednn::qconv2d_pointwise`,
`onednn::qlinear_pointwise`) from eager modules, with the activation scale computed per call:

- weights: int8, symmetric, one scale per output channel (prepacked once for oneDNN; a conv at its
  first call, for the conv kernel or, for inputs of at most 64 pixels, im2col + the int8 GEMM);
- activations: uint8, asymmetric, one scale and zero point per tensor from its min and max at each
  call (dynamic quantization: no calibration, any input range), quantized in one pass;
- output: the input's float dtype (fp32 or bf16), bias added in the kernel, and a ReLU that follows
  a conv in a Sequential too (`convert` fuses it).

Layers with 16 or fewer input or output channels stay float (conv_in's 4 latent channels: int8
does not pay off there), as do the per-sample Linears of the time embedding (their rows are the
batch). Replaced layers lose their `weight` Parameter: quantize a model after loading, fusing and
layout changes, and load it again to undo.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..loading.weights import own_memory

MIN_CHANNELS = 16
GEMM_MAX_PIXELS = 64  # conv inputs this small run as im2col + GEMM (Int8Conv2d._pack)
SKIP = ("time_embedding", "add_embedding", "time_emb_proj")  # per-sample Linears: M is the batch


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 `q`, scale and zero point (0-dim tensors) with x ~= (q - zero_point) * scale over
    x's range widened to include 0 (so that zero padding is exact)."""
    x = x.float()
    lo = x.amin().clamp(max=0)  # amin + amax: one pass each, faster here than aminmax
    hi = x.amax().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-8)
    zero_point = (-lo / scale).round().to(torch.int64)
    return to_uint8(x, scale, zero_point), scale, zero_point


def to_uint8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as a plain uint8 tensor of x's shape and strides.

    One pass (`torch.quantize_per_tensor`, whose storage is then viewed as uint8, what oneDNN
    takes) instead of five elementwise ops that each allocate an fp32 tensor: at TAESD's 512x512x64
    activations about 8x faster here, most of it the page faults of fresh allocations."""
    with warnings.catch_warnings():  # quint8 tensors are deprecated as a user type; only its kernel is used
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    return torch.empty(0, dtype=torch.uint8, device=x.device).set_(
        q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and their fp32 per-output-channel scales, symmetric (zero point 0)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp(min=1e-12)  # [O]
    q = (w / scale.view(-1, *[1] * (w.dim() - 1))).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def _take_weights(module: nn.Module, layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """Give an int8 module the scales, zero points and fp32 bias of `layer`; returns the int8 weight
    for oneDNN to prepack."""
    qweight, scale = quantize_weight(layer.weight)
    module.register_buffer("weight_scale", scale)
    module.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.int64))
    module.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
    return qweight


class Int8Conv2d(nn.Module):
    """A Conv2d (any stride, padding, dilation, groups; zero padding) with int8 weights and
    dynamically quantized uint8 inputs, run by `onednn::qconv2d_pointwise`. `relu` applies a ReLU
    to the output in the kernel (`convert` sets it where a ReLU follows in a Sequential)."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"Int8Conv2d takes zero padding given as numbers, not {conv.padding_mode}/{conv.padding}")
        self.in_channels, self.out_channels, self.relu = conv.in_channels, conv.out_channels, relu
        self.kernel = tuple(conv.kernel_size)
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.qweight = _take_weights(self, conv)  # packed at the first call, for the kernel its input
        self.packed, self.gemm = None, False  # size suits (`_pack`); then dropped

    def _pack(self, pixels: int) -> None:
        """oneDNN's int8 conv for inputs of more than GEMM_MAX_PIXELS pixels; for smaller ones im2col
        and one int8 GEMM (`gemm`), which is about 2x faster at SD's 8x8 level (1280-2560 channels)."""
        self.gemm = pixels <= GEMM_MAX_PIXELS and self.geometry[3] == 1
        if self.gemm:
            self.packed = torch.ops.onednn.qlinear_prepack(self.qweight.reshape(self.out_channels, -1), None)
        else:
            self.packed = torch.ops.onednn.qconv_prepack(self.qweight, self.weight_scale, 1.0, 0, *self.geometry, None)
        self.qweight = None

    def forward(self, x: torch.Tensor, upsample: tuple[int, int] | None = None) -> torch.Tensor:
        """conv(x), or with `upsample` conv(nearest(x, upsample)): the input is quantized before it
        is enlarged (same scale; a quarter of the bytes to copy)."""
        if self.packed is None:
            self._pack(upsample[0] * upsample[1] if upsample is not None else x.shape[-2] * x.shape[-1])
        unary = "relu" if self.relu else "none"
        if self.gemm:
            return self._gemm(x if upsample is None else F.interpolate(x, size=upsample, mode="nearest"), unary)
        q, scale, zero_point = quantize_activation(x)
        if upsample is not None:
            q = F.interpolate(q, size=upsample, mode="nearest")
        q = q.contiguous(memory_format=torch.channels_last)  # oneDNN's layout (its output's too): a
        return torch.ops.onednn.qconv2d_pointwise.tensor(  # uint8 copy here is cheaper than inside
            q, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias, *self.geometry,
            1.0, 0, x.dtype, unary, [], "")

    def _gemm(self, x: torch.Tensor, unary: str) -> torch.Tensor:
        """The conv as im2col (of the float input: its zero padding then quantizes to the exact zero
        point) and one int8 GEMM [B*L, C*kh*kw] x [C*kh*kw, O]."""
        stride, padding, dilation, _ = self.geometry
        b, _, h, w = x.shape
        oh, ow = ((n + 2 * p - d * (k - 1) - 1) // s + 1
                  for n, p, d, k, s in zip((h, w), padding, dilation, self.kernel, stride))
        cols = F.unfold(x, self.kernel, dilation, padding, stride).transpose(1, 2)  # [B, L, C*kh*kw]
        q, scale, zero_point = quantize_activation(cols.reshape(b * oh * ow, -1))
        y = torch.ops.onednn.qlinear_pointwise.tensor(
            q, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, x.dtype, unary, [], "")
        return y.view(b, oh, ow, self.out_channels).permute(0, 3, 1, 2)  # channels-last strides, as oneDNN's conv

    def extra_repr(self) -> str:
        stride, padding, _, groups = self.geometry
        return (f"{self.in_channels}, {self.out_channels}, stride={tuple(stride)}, padding={tuple(padding)}, "
                f"groups={groups}" + (", relu" if self.relu else ""))


class Int8Linear(nn.Module):
    """A Linear with int8 weights and dynamically quantized uint8 inputs (one scale for the whole
    input tensor), run by `onednn::qlinear_pointwise`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.onednn.qlinear_prepack(_take_weights(self, linear), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero_point = quantize_activation(x.reshape(-1, self.in_features))
        y = torch.ops.onednn.qlinear_pointwise.tensor(
            q, scale, zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, x.dtype, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def wanted(m: nn.Module, name: str) -> bool:
    """Whether the layer at dotted path `name` is worth int8 (see the module docstring)."""
    if any(part in name for part in SKIP):
        return False
    if isinstance(m, nn.Conv2d):
        return min(m.in_channels, m.out_channels) > MIN_CHANNELS and m.padding_mode == "zeros"
    return isinstance(m, nn.Linear) and min(m.in_features, m.out_features) > MIN_CHANNELS


@torch.no_grad()
def convert(module: nn.Module) -> int:
    """Replace, in place, every wanted Conv2d / Linear of a CPU float module by its int8 twin;
    returns how many were replaced. The float tensors left (norms, embeddings, the small convs) are
    then copied (`weights.own_memory`), so that they no longer keep the weight file mapped, its pages
    (read once to quantize) counted beside the int8 copies."""
    count = 0
    for name, m in list(module.named_modules()):
        for child_name, child in list(m.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if type(child) in (nn.Conv2d, nn.Linear) and wanted(child, path):
                setattr(m, child_name, (Int8Conv2d if isinstance(child, nn.Conv2d) else Int8Linear)(child))
                count += 1
        if isinstance(m, nn.Sequential):  # conv, ReLU -> one conv with the ReLU in its kernel
            for i in range(len(m) - 1):
                if isinstance(m[i], Int8Conv2d) and type(m[i + 1]) is nn.ReLU:
                    m[i].relu, m[i + 1] = True, nn.Identity()
    own_memory(module)
    return count
