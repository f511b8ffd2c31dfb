"""ControlNet: a trainable copy of the UNet's down and mid blocks, fed a control image, whose outputs
pass through zero-initialised 1x1 convolutions into the UNet's skips and mid block.

Follows Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"
(lllyasviel/ControlNet `cldm/cldm.py`) as diffusers lays it out (`ControlNetModel`): module names are
diffusers' state-dict keys, so a `ControlNetModel` folder loads with `strict=True`. The down and mid
blocks are the UNet's own classes (`models.unet`), built from the same `UNetConfig`: a ControlNet is
those blocks, a small conv net that embeds the control image, and the zero convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import UNetConfig
from ..errors import FewstepError
from .unet import DownBlock, MidBlock, TimestepEmbedding, embed_time

ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNetModel's structure: the UNet down / mid path it copies (`unet`; its up-block fields are
    unused), the control image's channels and the widths of the conv net that embeds it."""

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # shuffle-style: residuals averaged over space, guess mode implied
    bgr: bool = False  # controlnet_conditioning_channel_order "bgr": the control image's channels flipped

    def __post_init__(self):
        if not self.conditioning_embedding_out_channels or self.conditioning_channels < 1:
            raise FewstepError("ControlNet config: conditioning_channels and conditioning_embedding_out_channels "
                               "must be positive")

    @classmethod
    def from_diffusers(cls, d: dict) -> ControlNetConfig:
        """From a `ControlNetModel` config.json. It names only down blocks; the UNet config reader is given
        their mirror image as up blocks, so it checks every option with the UNet's rules."""
        down = d.get("down_block_types") or []
        up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ORDERS:
            raise FewstepError(f"ControlNet config: controlnet_conditioning_channel_order={order!r} is not "
                               f"supported (supported: {ORDERS})")
        return cls(unet=UNetConfig.from_diffusers({**d, "up_block_types": up}),
                   conditioning_channels=d.get("conditioning_channels", 3),
                   conditioning_embedding_out_channels=tuple(d.get("conditioning_embedding_out_channels")
                                                             or (16, 32, 96, 256)),
                   global_pool_conditions=bool(d.get("global_pool_conditions", False)), bgr=order == "bgr")

    def skip_channels(self) -> tuple[int, ...]:
        """The width of each skip the down path pushes (each gets one zero convolution), in order."""
        boc, n = self.unet.block_out_channels, len(self.unet.block_out_channels)
        out = [boc[0]]
        for level in range(n):
            out += [boc[level]] * (self.unet.layers_per_block[level] + (level < n - 1))
        return tuple(out)


class ControlNetConditioningEmbedding(nn.Module):
    """The control image [B, 3, H, W] -> [B, C0, H/8, W/8]: a conv, then per width a conv and a stride-2
    conv, SiLU between, and a zero-initialised conv out (the paper's "tiny network E")."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        ch = cfg.conditioning_embedding_out_channels
        self.conv_in = nn.Conv2d(cfg.conditioning_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(ch[:-1], ch[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(ch[-1], cfg.unet.block_out_channels[0], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """ControlNetModel: (noisy latent, timestep, text, control image) -> one residual per UNet skip and
    one for the mid block (`UNet.forward`'s `down_block_additional_residuals`, `mid_block_additional_residual`)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        n, c0 = len(u.block_out_channels), u.block_out_channels[0]
        if not u.mid_block:
            raise FewstepError("ControlNet config: a ControlNet without a mid block is not supported")
        self.conv_in = nn.Conv2d(u.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, u.time_embed_dim)
        self.add_embedding = None
        if u.addition_time_embed_dim is not None:
            self.add_embedding = TimestepEmbedding(u.projection_class_embeddings_input_dim, u.time_embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(cfg)
        self.down_blocks = nn.ModuleList(DownBlock(u, i) for i in range(n))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in cfg.skip_channels())
        self.mid_block = MidBlock(u)
        self.controlnet_mid_block = nn.Conv2d(u.block_out_channels[-1], u.block_out_channels[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                scale: float = 1.0, guess_mode: bool = False, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x [B, 4, h, w] (the UNet's scaled input), hint [B, C, 8h, 8w] in [0, 1]. Returns the skips'
        residuals and the mid block's, times `scale`; in guess mode the skips' scales rise from 0.1 (the
        first, shallowest) to 1 (the mid block) on a log scale, as diffusers does."""
        if self.cfg.bgr:
            hint = torch.flip(hint, dims=[1])
        emb = embed_time(self.cfg.unet, self.time_embedding, self.add_embedding, x, t, text_embeds, time_ids, None)
        x = self.conv_in(x) + self.controlnet_cond_embedding(hint.to(x.dtype))
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, context, skips)
        x = self.mid_block(x, emb, context)
        downs = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not self.cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(downs) + 1, device=x.device) * scale  # 0.1 ... 1
            downs, mid = [d * s for d, s in zip(downs, scales)], mid * scales[-1]
        else:
            downs, mid = [d * scale for d in downs], mid * scale
        if self.cfg.global_pool_conditions:
            downs, mid = [d.mean(dim=(2, 3), keepdim=True) for d in downs], mid.mean(dim=(2, 3), keepdim=True)
        return downs, mid
