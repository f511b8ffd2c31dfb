"""Building blocks shared by the UNet and the VAE: residual conv blocks, resampling, attention.

Follows the Latent Diffusion Model code (Rombach et al. 2022, CompVis `ldm/modules`) as re-laid out
by diffusers (`resnet.py`, `attention_processor.py`): attribute names are diffusers' state-dict
keys, so checkpoints load with `strict=True`. Attention is one call to
`torch.nn.functional.scaled_dot_product_attention` (no processor indirection).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between (UNet only; the VAE passes
    `temb_channels=None`) and a 1x1 conv shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # In place where autograd allows it: the SiLUs (inference only: their backward needs their
        # input) and the adds into a conv's fresh output. Same values; at the VAE decoder's sizes
        # (up to 256 x 512 x 512 floats) each avoided allocation is a large page-faulted buffer.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None:
            h = h.add_(self.time_emb_proj(F.silu(temb))[:, :, None, None])  # [B, C, 1, 1]
        h = F.silu(self.norm2(h), inplace=inplace)  # the conv1 output is freed here
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)  # x + h


class Downsample2D(nn.Module):
    """3x3 conv with stride 2. The VAE encoder (`asymmetric=True`) pads only right and bottom, as
    the original LDM autoencoder did; the UNet pads 1 on every side."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def fold_upsample_weight(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel `w` [O, I, 3, 3] applied after a nearest x2 upsample, as four 2x2 kernels on
    the small image, one per output phase (row parity, column parity): [4 * O, I, 2, 2].

    An output pixel at row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are small rows i-1, i, i:
    the kernel's rows collapse to (w0, w1 + w2) over small rows (i-1, i); at row 2i+1 they are
    i, i, i+1, so (w0 + w1, w2) over (i, i+1). Columns likewise. 16 taps per small pixel instead of
    36: 2.25x fewer multiply-adds, and the 4x larger upsampled input is never built."""
    w32 = w.float()
    rows = (torch.stack([w32[:, :, 0], w32[:, :, 1] + w32[:, :, 2]], 2),  # even output rows
            torch.stack([w32[:, :, 0] + w32[:, :, 1], w32[:, :, 2]], 2))  # odd output rows
    phases = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if px == 0 else
              torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1) for r in rows for px in (0, 1)]
    return torch.cat(phases).to(w.dtype)  # [(py, px, O), I, 2, 2]


def upsample_conv(x: torch.Tensor, w_folded: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv3x3(nearest_x2(x))` from the folded kernel of `fold_upsample_weight`: one 2x2 conv with
    4x the output channels on the zero-padded small image, then each phase written to its pixels,
    in the conv output's memory layout (channels-last in, channels-last out)."""
    b, _, h, w = x.shape
    o = w_folded.shape[0] // 4
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), w_folded)  # [B, 4 * O, H + 1, W + 1], phases (py, px) in order
    nhwc = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    out = torch.empty(b, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    for py in (0, 1):
        for px in (0, 1):  # even output rows read small rows (i-1, i): the 2x2 window at padded row i;
            p = 2 * py + px  # odd rows read (i, i+1): window i + 1. Columns likewise.
            out[:, :, py::2, px::2] = y[:, p * o:(p + 1) * o, py:py + h, px:px + w]
    return out if bias is None else out.add_(bias[:, None, None])


FOLD_MIN_PIXELS = 32 * 32  # smallest input (H * W) that `nearest_up_conv` runs folded


def folded_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """`fold_upsample_weight(conv.weight)`. Without autograd it is kept on the conv and rebuilt when
    the weight changes (storage, in-place version, dtype, device): 16/9 of the conv's weight memory
    (38 MB for the SD VAE decoder in fp32). With autograd, or while torch.compile traces, it is
    computed in the graph instead."""
    w = conv.weight
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return fold_upsample_weight(w)
    version = -1 if w.is_inference() else w._version  # inference tensors keep no version counter
    key = (w.data_ptr(), version, w.dtype, w.device)
    cached = conv.__dict__.get("_folded")
    if cached is None or cached[0] != key:
        cached = conv.__dict__["_folded"] = (key, fold_upsample_weight(w))
    return cached[1]


@contextmanager
def unfolded():
    """Run every `nearest_up_conv` as written (upsample, then the 3x3 conv): the model's nominal math,
    which `fewstep inspect` reports and FLOP counts compare with."""
    global FOLD_MIN_PIXELS
    saved, FOLD_MIN_PIXELS = FOLD_MIN_PIXELS, float("inf")
    try:
        yield
    finally:
        FOLD_MIN_PIXELS = saved


def nearest_up_conv(x: torch.Tensor, conv: nn.Conv2d, size: tuple[int, int] | None = None) -> torch.Tensor:
    """`conv(nearest(x, 2x or size))` for a 3x3, padding-1 conv. From FOLD_MIN_PIXELS up an exact
    doubling runs as `upsample_conv` (2.25x fewer multiply-adds, equal up to float rounding; about
    2x faster on CPU at the VAE decoder's sizes); smaller inputs and odd sizes run as written."""
    h, w = x.shape[-2:]
    size = (2 * h, 2 * w) if size is None else tuple(size)
    if not isinstance(conv, nn.Conv2d):  # an int8 conv (fewstep.speed.int8): no float weight to fold; it
        return conv(x, upsample=size)  # enlarges its quantized input
    if size == (2 * h, 2 * w) and h * w >= FOLD_MIN_PIXELS:
        return upsample_conv(x, folded_kernel(conv), conv.bias)
    return conv(F.interpolate(x, size=size, mode="nearest"))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (see `nearest_up_conv`). `size` lets the UNet match an
    odd-sized skip tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return nearest_up_conv(x, self.conv, size)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, L, heads * d] tensors, returns [B, Lq, heads * d].

    `upcast` runs fp16 inputs in fp32: SD 2.1 (768-v) logits overflow fp16's range. bf16 has fp32's
    range, so it is left alone. (diffusers' SDPA processor ignores the flag; in fp32 both agree.)"""
    b, lq, inner = q.shape
    dtype = q.dtype
    if upcast and dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(b, lq, heads, -1).transpose(1, 2)  # [B, heads, Lq, d]
    k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)  # [B, heads, Lk, d]
    v = v.view(b, v.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, inner).to(dtype)


def downsample_tokens(t: torch.Tensor, size: tuple[int, int], factor: int) -> torch.Tensor:
    """[B, H*W, C] tokens of an H x W grid -> [B, ceil(H/f) * ceil(W/f), C], each the mean of an f x f
    patch (of what is left of one at the edges): the keys and values of ToDo's self-attention
    (Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images")."""
    b, _, c = t.shape
    grid = t.view(b, *size, c).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, factor, ceil_mode=True).flatten(2).transpose(1, 2)


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the concatenation of the given Linears' outputs (same input)."""
    w = torch.cat([m.weight for m in linears])  # [sum(out), in]
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    with torch.device("meta"):
        fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=linears[0].bias.requires_grad)
    return fused


class Attention(nn.Module):
    """Transformer attention: bias-free q/k/v, biased output projection (`to_out.0`, as diffusers
    keeps a dropout at `to_out.1`). Self-attention when `context` is None.

    `fuse_projections` trades the three projections for one matmul (`to_qkv`, self-attention) or two
    (`to_q` + `to_kv`, cross-attention), as diffusers' `fuse_qkv_projections` does. It runs after
    the checkpoint is loaded: a fused module's state_dict has `to_qkv` / `to_kv` keys instead."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])
        self.to_qkv = self.to_kv = None  # set by fuse_projections

    @torch.no_grad()
    def fuse_projections(self, self_attention: bool) -> None:
        """Concatenate q, k, v (`self_attention`: this module never sees a context) or k, v (cross)."""
        if self.to_qkv is not None or self.to_kv is not None:
            return
        if self_attention:
            self.to_qkv = fuse_linears(self.to_q, self.to_k, self.to_v)
            self.to_q = None
        else:
            self.to_kv = fuse_linears(self.to_k, self.to_v)
        self.to_k = self.to_v = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.to_qkv is not None:
            if context is not None:
                raise RuntimeError("a self-attention fused with fuse_projections(True) was given a context")
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # [B, L, inner] views of [B, L, 3 * inner]
        else:
            context = x if context is None else context
            q = self.to_q(x)
            if self.to_kv is not None:
                k, v = self.to_kv(context).chunk(2, dim=-1)
            else:
                k, v = self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(q, k, v, self.heads, self.upcast))


class VAEAttention(nn.Module):
    """The VAE mid block's single-head spatial self-attention with its own GroupNorm and residual
    (LDM `AttnBlock`; diffusers stores its 1x1 convs as Linear layers under these names)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]; free when channels-last
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        out = self.to_out[0](out).reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, H, W], channels-last strides
        return x + out  # x first: the sum keeps x's memory format
