"""The UNet-level view of an inspected UNet: its levels, resamplers, skip connections and attention,
read from the per-layer shapes of `fewstep.inspect` (the data the diagram and the report draw on).

The skip bookkeeping mirrors `fewstep.models.unet` (Ronneberger et al. 2015's U-Net as laid out in
LDM's `openaimodel.py`): conv_in's output and the output of every down-block resnet (after its
transformer, where the level has attention) and of every downsampler are pushed on a stack; each
up-block resnet pops one and concatenates it to its input along channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..configs import UNetConfig
from ..errors import FewstepError
from .records import Component, Layer


@dataclass
class Resampler:
    name: str  # "down_blocks.0.downsamplers.0"
    kind: str  # "down" | "up"
    method: str
    kernel: tuple
    stride: tuple
    padding: tuple
    input_shape: tuple
    output_shape: tuple


@dataclass
class Skip:
    source: str  # the module whose output is kept
    target: str  # the up-block resnet that concatenates it
    shape: tuple  # the skip tensor
    x_channels: int  # what comes up from the deeper level
    skip_channels: int
    total_channels: int  # the resnet's input width: x_channels + skip_channels


@dataclass
class AttentionSite:
    block: str
    kind: str  # "self" | "cross"
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    count: int  # attention layers of this kind in the block (transformer blocks x transformers)


@dataclass
class UNetBlock:
    name: str
    stage: str  # "in" | "time" | "down" | "mid" | "up" | "out"
    resolution: tuple[int, int] | None  # where its resnets and attention work
    in_channels: int | None
    out_channels: int | None
    resnets: int
    transformers: int
    transformer_depth: int  # BasicTransformerBlocks in each transformer (SDXL: up to 10)
    attention: tuple[str, ...]  # kinds present, e.g. ("self", "cross")
    resampler: str  # "" or "down to 32x32" / "up to 16x16"
    params: int
    flops: int


@dataclass
class UNetStructure:
    blocks: list[UNetBlock]
    resamplers: list[Resampler]
    skips: list[Skip]
    attention: list[AttentionSite]


def _stage(name: str) -> str:
    head = name.split(".")[0]
    return {"conv_in": "in", "time_embedding": "time", "add_embedding": "time", "down_blocks": "down",
            "mid_block": "mid", "up_blocks": "up"}.get(head, "out")


def _count(layers: list[Layer], block: str, group: str) -> int:
    return sum(1 for layer in layers if re.fullmatch(rf"{re.escape(block)}\.{group}\.\d+", layer.name))


def _channels(s: tuple | None) -> int | None:
    return s[1] if s and len(s) == 4 else None


def _block(b, layers: dict[str, Layer]) -> UNetBlock:
    members = b.layers
    first = layers.get(f"{b.name}.resnets.0") or layers[b.name]
    res = tuple(first.input_shape[-2:]) if first.input_shape and len(first.input_shape) == 4 else None
    kinds = tuple(sorted({m.attention.kind for m in members if m.attention}, key=["self", "cross"].index))
    resampler = ""
    for group, word in (("downsamplers", "down"), ("upsamplers", "up")):
        r = layers.get(f"{b.name}.{group}.0")
        if r is not None:
            resampler = f"{word} to {r.output_shape[-2]}x{r.output_shape[-1]}"
    return UNetBlock(b.name, _stage(b.name), res, _channels(b.input_shape), _channels(b.output_shape),
                     _count(members, b.name, "resnets"), _count(members, b.name, "attentions"),
                     _count(members, f"{b.name}.attentions.0", "transformer_blocks"), kinds,
                     resampler, b.params, b.flops)


def _resamplers(layers: dict[str, Layer]) -> list[Resampler]:
    out = []
    for name, layer in layers.items():
        if m := re.fullmatch(r"\w+\.\d+\.(down|up)samplers\.\d+", name):
            conv = layers[name + ".conv"]
            out.append(Resampler(name, m.group(1), layer.note, conv.kernel, conv.stride, conv.padding,
                                 layer.input_shape, layer.output_shape))
    return out


def _skips(cfg: UNetConfig, layers: dict[str, Layer]) -> list[Skip]:
    n = len(cfg.block_out_channels)
    stack = ["conv_in"]
    for i in range(n):
        for j in range(cfg.layers_per_block[i]):
            stack.append(f"down_blocks.{i}.{'attentions' if cfg.down_attention[i] else 'resnets'}.{j}")
        if i < n - 1:
            stack.append(f"down_blocks.{i}.downsamplers.0")
    skips = []
    for i in range(n):
        for j in range(cfg.layers_per_block[n - 1 - i] + 1):
            source, target = stack.pop(), f"up_blocks.{i}.resnets.{j}"
            shape, total = layers[source].output_shape, layers[target].input_shape[1]
            skips.append(Skip(source, target, shape, total - shape[1], shape[1], total))
    if stack:
        raise FewstepError(f"UNet skip bookkeeping is off: {stack} never consumed")  # a bug, not user error
    return skips


def _attention(blocks) -> list[AttentionSite]:
    sites: dict[tuple, AttentionSite] = {}
    for b in blocks:
        for layer in b.layers:
            a = layer.attention
            if a is not None:
                key = (b.name, a.kind, a.heads, a.head_dim, a.q_len, a.kv_len)
                sites.setdefault(key, AttentionSite(*key, count=0)).count += 1
    return list(sites.values())


def unet_structure(unet: Component, cfg: UNetConfig) -> UNetStructure:
    layers = {layer.name: layer for layer in unet.layers}
    return UNetStructure([_block(b, layers) for b in unet.blocks], _resamplers(layers), _skips(cfg, layers),
                         _attention(unet.blocks))
