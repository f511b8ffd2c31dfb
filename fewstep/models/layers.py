"""Building blocks shared by the UNet and the VAE: residual conv blocks, resampling, attention.

Follows the Latent Diffusion Model code (Rombach et al. 2022, CompVis `ldm/modules`) as re-laid out
by diffusers (`resnet.py`, `attention_processor.py`): attribute names are diffusers' state-dict
keys, so checkpoints load with `strict=True`. Attention is one call to
`torch.nn.functional.scaled_dot_product_attention` (no processor indirection).
"""

from __future__ import annotations

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
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # [B, C, 1, 1]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


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


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. `size` lets the UNet match an odd-sized skip tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


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


class Attention(nn.Module):
    """Transformer attention: bias-free q/k/v, biased output projection (`to_out.0`, as diffusers
    keeps a dropout at `to_out.1`). Self-attention when `context` is None."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)


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
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out
