"""T2I-Adapter: a small conv net that turns a control image into one feature map per UNet down block,
added inside the UNet's down path once per generation (no timestep, no text).

Follows Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models" (TencentARC/T2I-Adapter `ldm/modules/encoders/adapter.py`: `Adapter`
and `Adapter_light`) as diffusers lays it out (`T2IAdapter`, adapter_type "full_adapter",
"full_adapter_xl", "light_adapter"): module names are diffusers' keys under `adapter.`. The three
kinds differ only in data: which body block changes width, which halves the resolution, and whether
the blocks are full or light; the config reader turns the adapter_type into that data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FewstepError

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class AdapterConfig:
    """`blocks`: (in width, out width, halves the resolution) per body block, in order. `light`: the light
    adapter's blocks (1x1 in / out convs around narrow resnets) and no conv_in."""

    in_channels: int = 3
    downscale_factor: int = 8  # the pixel-unshuffle's factor
    num_res_blocks: int = 2
    blocks: tuple[tuple[int, int, bool], ...] = ((320, 320, False), (320, 640, True), (640, 1280, True),
                                                 (1280, 1280, True))
    light: bool = False

    @property
    def unshuffled(self) -> int:
        return self.in_channels * self.downscale_factor ** 2

    @classmethod
    def from_diffusers(cls, d: dict) -> AdapterConfig:
        kind = d.get("adapter_type", "full_adapter")
        if kind not in ADAPTER_TYPES:
            raise FewstepError(f"T2IAdapter config: adapter_type {kind!r} is not supported "
                               f"(supported: {ADAPTER_TYPES})")
        ch = tuple(d.get("channels", (320, 640, 1280, 1280)))
        cin, factor = d.get("in_channels", 3), d.get("downscale_factor", 8)
        if kind == "full_adapter":
            blocks = [(ch[0], ch[0], False)] + [(ch[i - 1], ch[i], True) for i in range(1, len(ch))]
        elif kind == "full_adapter_xl":  # one halving, at the third block
            blocks = [(ch[i - 1] if i in (1, 2) else ch[i], ch[i], i == 2) for i in range(len(ch))]
        else:  # light: the first block reads the unshuffled image; one more halving block at the end
            blocks = ([(cin * factor ** 2, ch[0], False)] + [(ch[i], ch[i + 1], True) for i in range(len(ch) - 1)]
                      + [(ch[-1], ch[-1], True)])
        return cls(cin, factor, d.get("num_res_blocks", 4 if kind == "light_adapter" else 2), tuple(blocks),
                   kind == "light_adapter")


class AdapterResnetBlock(nn.Module):
    """conv, ReLU, conv, plus the input (the light block's second conv is 3x3, the full block's 1x1)."""

    def __init__(self, c: int, light: bool):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(c, c, 3, padding=1) if light else nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.act(self.block1(x))) + x


class AdapterBlock(nn.Module):
    """Average-pool by 2 (where the block halves), then a full block: a 1x1 conv where the width changes
    and resnets at the out width; or a light block: 1x1 in to a quarter of the width, resnets, 1x1 out."""

    def __init__(self, cin: int, cout: int, down: bool, cfg: AdapterConfig):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        width = cout // 4 if cfg.light else cout
        self.in_conv = nn.Conv2d(cin, width, 1) if cfg.light or cin != cout else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(width, cfg.light) for _ in range(cfg.num_res_blocks)))
        self.out_conv = nn.Conv2d(width, cout, 1) if cfg.light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return x if self.out_conv is None else self.out_conv(x)


class AdapterBody(nn.Module):
    """Pixel-unshuffle, conv_in (full adapters), the body blocks; each block's output is one feature map."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        self.conv_in = None if cfg.light else nn.Conv2d(cfg.unshuffled, cfg.blocks[0][0], 3, padding=1)
        self.body = nn.ModuleList(AdapterBlock(cin, cout, down, cfg) for cin, cout, down in cfg.blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """The control image [B, C, H, W] in [0, 1] -> feature maps for `UNet.forward`'s
    `down_intrablock_additional_residuals`."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter = AdapterBody(cfg)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.adapter(x)
