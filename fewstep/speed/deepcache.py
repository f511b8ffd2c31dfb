"""DeepCache: reuse the UNet's deep features across sampling steps, recompute only a shallow branch.

Follows Ma, Fang, Wang 2023, "DeepCache: Accelerating Diffusion Models for Free" (arXiv 2312.00858)
and its reference code (github.com/horseee/DeepCache): `branch` is the reference's
`cache_branch_id` of `DeepCacheSDHelper.set_params(cache_interval, cache_branch_id)`
(`DeepCache/extension/deepcache.py`, the pip package). The high-level features entering the up
path change little from one step to the next, so every `interval`-th UNet call runs in full and
keeps the feature that enters the up path at skip branch `branch`; the calls in between run only
the shallow sub-network above that skip and take the deep part from the cache.

Skip branches are the skip tensors of the down path, counted from the top: 0 is conv_in's output,
then one per (resnet + transformer) unit of each level and one per downsampler. With SD 1.x / 2.x /
XL's layout (2 resnets + a downsampler per level) that is the reference's 3 * level + unit. A cached
call with branch b runs conv_in, the down units that make skips 1..b, the up units that eat skips
b..0 and conv_out; the cached feature is the input of the up unit that eats skip b. So branch 0
(the reference default) recomputes only conv_in, the top up block's last resnet (+ transformer)
and conv_out; the deepest branch skips only the mid block. (The paper's first SD implementation,
`DeepCache/sd/unet_2d_condition.py` with cache_layer_id=0, cache_block_id=0, is branch 1 here.)
Cached calls walk the UNet's blocks directly: under `fewstep.speed.compile` use regional compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewstepError
from ..models.layers import ResnetBlock2D


def down_units(unet: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """The down path after conv_in as (module, transformer or None) units, one per skip it pushes.
    A downsampler is a unit with no transformer; it is called without the time embedding."""
    units = []
    for block in unet.down_blocks:
        for j, resnet in enumerate(block.resnets):
            units.append((resnet, block.attentions[j] if block.attentions else None))
        units += [(down, None) for down in block.downsamplers]
    return units


def up_units(unet: nn.Module) -> list[tuple[nn.Module, nn.Module | None, list]]:
    """The up path as (resnet, transformer or None, upsamplers run after it) units, deepest first;
    unit k eats skip number len(units) - 1 - k (skip 0 is conv_in's output)."""
    units = []
    for block in unet.up_blocks:
        last = len(block.resnets) - 1
        for j, resnet in enumerate(block.resnets):
            units.append((resnet, block.attentions[j] if block.attentions else None,
                          list(block.upsamplers) if j == last else []))
    return units


def num_branches(unet: nn.Module) -> int:
    """How many skip branches a DeepCache `branch` can name on this UNet (0 .. this - 1)."""
    return len(down_units(unet)) + 1  # conv_in's output, then one per down unit


def forward(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None, timestep_cond: torch.Tensor | None,
            branch: int, deep: torch.Tensor | None, token_downsample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet call, the same operations as `UNet.forward`. With deep=None it runs in full and also
    returns the feature entering up unit `enter` (the one that eats skip `branch`); with a cached
    `deep` it runs only the down units that make skips 1..branch and the up units from `enter` on."""
    emb = unet.time_embed(x, t, text_embeds, time_ids, timestep_cond)  # [B, 4 * C0]
    h = unet.conv_in(x)
    skips = [h]
    downs, ups = down_units(unet), up_units(unet)
    for module, attn in downs if deep is None else downs[:branch]:
        h = module(h, emb) if isinstance(module, ResnetBlock2D) else module(h)  # a downsampler takes no emb
        if attn is not None:
            h = attn(h, context, token_downsample)
        skips.append(h)
    if deep is None and unet.mid_block is not None:
        h = unet.mid_block(h, emb, context, token_downsample)
    enter = len(ups) - 1 - branch  # the up unit that eats skip `branch`
    if deep is not None:
        h = deep
    feature = h
    for k in range(0 if deep is None else enter, len(ups)):
        resnet, attn, upsamplers = ups[k]
        if k == enter:
            feature = h
        h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
        if attn is not None:
            h = attn(h, context, token_downsample)
        for up in upsamplers:
            h = up(h, size=skips[-1].shape[-2:])  # odd latent sizes: match the skip, as UNet.forward does
    return unet.conv_out(F.silu(unet.conv_norm_out(h))), feature


@dataclass(frozen=True)
class DeepCache:
    """Run the UNet in full on every `interval`-th call and only its shallow skip branch `branch`
    (see the module docstring) in between. interval=1 is the plain UNet."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise FewstepError(f"DeepCache interval={self.interval!r} must be an integer >= 1 (1 turns caching off)")
        if not isinstance(self.branch, int) or self.branch < 0:
            raise FewstepError(f"DeepCache branch={self.branch!r} must be an integer >= 0 (0 caches the most)")

    def wrap(self, unet: nn.Module) -> CachedUNet:
        """A fresh stateful callable with the UNet's signature; make one per generation."""
        n = num_branches(unet)
        if self.branch >= n:
            raise FewstepError(f"DeepCache branch={self.branch} is out of range: this UNet has {n} skip branches "
                               f"(0..{n - 1})")
        return CachedUNet(unet, self.interval, self.branch)


class CachedUNet:
    """Call k (from 0) is full when k % interval == 0 (or when the batch or latent size changed
    since the cached call); the others reuse the deep feature of the last full call."""

    def __init__(self, unet: nn.Module, interval: int, branch: int):
        self.unet, self.interval, self.branch = unet, interval, branch
        self.calls = self.full_calls = 0
        self.deep: torch.Tensor | None = None
        self.shape: tuple | None = None  # x's shape at the caching call

    @property
    def cfg(self):
        return self.unet.cfg

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 timestep_cond: torch.Tensor | None = None, token_downsample: int = 1) -> torch.Tensor:
        full = self.calls % self.interval == 0 or self.deep is None or tuple(x.shape) != self.shape
        self.calls += 1
        if self.interval == 1:
            self.full_calls += 1
            return self.unet(x, t, context, text_embeds, time_ids, timestep_cond, token_downsample)
        out, feature = forward(self.unet, x, t, context, text_embeds, time_ids, timestep_cond, self.branch,
                               None if full else self.deep, token_downsample)
        if full:
            self.full_calls += 1
            self.deep, self.shape = feature, tuple(x.shape)
        return out
