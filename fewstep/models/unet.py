"""The conditional denoising UNet of Stable Diffusion 1.x / 2.x / XL and their few-step variants.

Follows Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(CompVis `ldm/modules/diffusionmodules/openaimodel.py`) and, for SDXL's size/crop conditioning,
Podell et al. 2023, "SDXL". Module names are diffusers' `UNet2DConditionModel` state-dict keys, so
a diffusers `unet/` folder loads with `strict=True` and no renaming. Everything that differs between
model families (attention per level, transformer depth, heads, add-embeddings) is read from one
`UNetConfig`; there are no version branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import UNetConfig
from ..errors import FewstepError
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, downsample_tokens


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t [N] -> [N, dim], in fp32.

    Computed on the fly rather than kept as a buffer: a buffer would be a key diffusers does not have."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None]  # [N, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on sinusoidal features; `cond_proj` adds LCM's guidance-scale embedding."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            if self.cond_proj is None:
                raise FewstepError("timestep_cond was given but this UNet has no time_cond_proj_dim (not an LCM UNet)")
            x = x + self.cond_proj(cond.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection makes both the value and the gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU up-projection to 4x width, then back down."""

    def __init__(self, dim: int):
        super().__init__()
        # index 1 is dropout in diffusers; an Identity keeps the output layer at key `net.2`
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward. With
    `only_cross` (SDXS-style) the first attention also attends to the text instead of the image."""

    def __init__(self, dim: int, heads: int, context_dim: int, only_cross: bool, upcast: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, context_dim if only_cross else dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None,
                kv_downsample: int = 1) -> torch.Tensor:
        """x: [B, H*W, C] tokens of an H x W grid (`size`, needed when kv_downsample > 1: the
        self-attention's keys and values then come from kv_downsample x kv_downsample-pooled tokens)."""
        h = self.norm1(x)
        if self.only_cross:
            kv = context
        elif kv_downsample > 1:
            if self.attn1.to_qkv is not None:
                raise FewstepError("token downsampling needs separate q and k/v projections, but they were fused "
                                   "without it: load the model again with both options together")
            kv = downsample_tokens(h, size, kv_downsample)
        else:
            kv = None
        x = x + self.attn1(h, kv)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project in, `depth` transformer blocks over the H*W tokens, project out, residual.
    The projections are 1x1 convs in SD 1.x and Linear layers in SD 2.x / XL (same maths, other shapes)."""

    def __init__(self, cfg: UNetConfig, level: int, only_cross: bool):
        super().__init__()
        c = cfg.block_out_channels[level]
        self.level = level  # 0: full latent resolution
        # ToDo pools the self-attention keys / values of the highest-resolution level with attention only
        self.pools_tokens = level == cfg.top_attention_level and not only_cross
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(c, cfg.num_heads[level], cfg.cross_attention_dim, only_cross, cfg.upcast_attention)
            for _ in range(cfg.transformer_depth[level]))
        self.proj_out = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, token_downsample: int = 1) -> torch.Tensor:
        """`token_downsample`: ToDo's pooling factor, applied where `pools_tokens` (1: off)."""
        b, c, h, w = x.shape
        factor = token_downsample if self.pools_tokens else 1
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, (h, w), factor)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, H, W] with channels-last strides
        if not self.linear:
            t = self.proj_out(t)
        return x + t  # x first: the sum keeps x's memory format (NCHW or channels-last), not t's


class DownBlock(nn.Module):
    """One encoder level: resnets (each followed by a transformer where the level has attention),
    then a stride-2 conv except at the deepest level. Every output is pushed onto `skips`."""

    def __init__(self, cfg: UNetConfig, level: int):
        super().__init__()
        boc, temb = cfg.block_out_channels, cfg.time_embed_dim
        cin, c = boc[max(level - 1, 0)], boc[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if j == 0 else c, c, temb, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(cfg.layers_per_block[level]))
        self.attentions = nn.ModuleList(
            Transformer2DModel(cfg, level, cfg.only_cross_attention[level])
            for _ in range(cfg.layers_per_block[level]) if cfg.down_attention[level])
        last = level == len(boc) - 1
        self.downsamplers = nn.ModuleList([] if last else [Downsample2D(c)])

    def forward(self, x, temb, context, skips: list[torch.Tensor], token_downsample: int = 1,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`residual`: a T2I-Adapter's features, added where diffusers adds them: after the last resnet +
        transformer of a level with attention, else to the block's output (its last skip too)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context, token_downsample)
                if residual is not None and j == len(self.resnets) - 1:
                    x = x + residual
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        if residual is not None and not self.attentions:
            x = skips[-1] = x + residual
        return x


class MidBlock(nn.Module):
    """Resnet, transformer, resnet at the deepest level (UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        level = len(cfg.block_out_channels) - 1
        c = cfg.block_out_channels[level]
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(cfg, level, only_cross=False)])

    def forward(self, x, temb, context, token_downsample: int = 1) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, token_downsample)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One decoder level (`index` counts from the deepest): one more resnet than the encoder level,
    each eating a skip from `skips`, then nearest x2 + conv except at the top level."""

    def __init__(self, cfg: UNetConfig, index: int):
        super().__init__()
        boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
        level = n - 1 - index
        c = boc[level]
        c_prev = boc[min(level + 1, n - 1)]  # what the deeper up block (or mid block) outputs
        c_skip = boc[max(level - 1, 0)]  # the last skip: the downsampler output of the level above
        layers = cfg.layers_per_block[level] + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D((c_prev if j == 0 else c) + (c_skip if j == layers - 1 else c), c,
                          cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(layers))
        self.attentions = nn.ModuleList(
            Transformer2DModel(cfg, level, cfg.only_cross_attention[level])
            for _ in range(layers) if cfg.up_attention[index])
        self.upsamplers = nn.ModuleList([Upsample2D(c)] if level > 0 else [])

    def forward(self, x, temb, context, skips: list[torch.Tensor], token_downsample: int = 1) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[j](x, context, token_downsample)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])  # odd latent sizes: match the skip, not just x2
        return x


def embed_time(cfg: UNetConfig, time_embedding: TimestepEmbedding, add_embedding: TimestepEmbedding | None,
               x, t, text_embeds, time_ids, timestep_cond) -> torch.Tensor:
    """The [B, 4 * C0] embedding every resnet of a UNet (or of a ControlNet, its copy of the down path)
    receives: timestep (+ LCM guidance) (+ SDXL size/crop)."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # [B]
    feats = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = time_embedding(feats.to(x.dtype), timestep_cond)  # [B, 4 * C0]
    if add_embedding is None:
        return emb
    if text_embeds is None or time_ids is None:
        raise FewstepError("this UNet (SDXL-style) needs text_embeds (pooled text) and time_ids (size/crop)")
    ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                             cfg.freq_shift).reshape(text_embeds.shape[0], -1)  # [B, 6 * 256]
    add = torch.cat([text_embeds.to(emb.dtype), ids.to(emb.dtype)], dim=-1)  # [B, 1280 + 1536]
    return emb + add_embedding(add)


class UNet(nn.Module):
    """UNet2DConditionModel: predicts noise (or v / x0, per the scheduler) from a noisy latent x,
    timesteps t and text context; SDXL also takes pooled text_embeds and size/crop time_ids."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        n, c0 = len(cfg.block_out_channels), cfg.block_out_channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.add_embedding = None
        if cfg.addition_time_embed_dim is not None:
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(DownBlock(cfg, i) for i in range(n))
        self.mid_block = MidBlock(cfg) if cfg.mid_block else None
        self.up_blocks = nn.ModuleList(UpBlock(cfg, i) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)

    def time_embed(self, x, t, text_embeds, time_ids, timestep_cond) -> torch.Tensor:
        return embed_time(self.cfg, self.time_embedding, self.add_embedding, x, t, text_embeds, time_ids,
                          timestep_cond)

    def encode(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, token_downsample: int = 1,
               intrablock: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The first half of `forward`: conv_in, the down blocks, the mid block. Returns the mid block's
        output, the skips the up path eats, and each down block's output (the features a latent
        discriminator reads, train/distill.py). `intrablock`: T2I-Adapter features, one per down block
        in order, and one more after the mid block where its shape matches (SDXL adapters), as diffusers."""
        x = self.conv_in(x)
        skips, outputs = [x], []  # the down path pushes, the up path pops
        extra = list(intrablock or ())
        for block in self.down_blocks:
            x = block(x, emb, context, skips, token_downsample, extra.pop(0) if extra else None)
            outputs.append(x)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, token_downsample)
            if extra and extra[0].shape == x.shape:
                x = x + extra.pop(0)
        return x, skips, outputs

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None, token_downsample: int = 1,
                down_block_additional_residuals: list[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`token_downsample`: ToDo (Smith et al. 2024), an approximation: the highest-resolution
        self-attention takes keys / values from F x F-pooled tokens (1: off, the exact model). The residuals
        are diffusers' arguments of the same names: a ControlNet's, added to each skip and to the mid block's
        output; a T2I-Adapter's, added inside the down path (`encode`)."""
        emb = self.time_embed(x, t, text_embeds, time_ids, timestep_cond)
        x, skips, _ = self.encode(x, emb, context, token_downsample, down_intrablock_additional_residuals)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            x = block(x, emb, context, skips, token_downsample)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
