"""TAESD, the tiny autoencoder for Stable Diffusion latents (Ollin Boer Bohan, github.com/madebyollin/taesd).

The structure follows madebyollin's `taesd.py`: plain conv / ReLU stacks in an `nn.Sequential` whose
order *is* the file format. Attribute names follow diffusers' `AutoencoderTiny`
(`encoder.layers.{i}...`, `decoder.layers.{i}...`), so a diffusers folder loads with `strict=True`;
`load_taesd` maps the original taesd.py files onto that layout with one explicit, checked rule.

Same semantics as diffusers `AutoencoderTiny.encode(x).latents` / `.decode(z).sample`: images are in
[-1, 1] (TAESD itself works in [0, 1]); latents are the diffusion model's latents, unscaled
(TAESD is trained to match them directly, so `cfg.scaling_factor` is 1.0 and not applied here).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..configs import TAEConfig
from ..errors import FewstepError
from .layers import nearest_up_conv


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Residual block: three 3x3 convs, identity skip, ReLU after the sum (diffusers AutoencoderTinyBlock)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(conv(c, c), nn.ReLU(), conv(c, c), nn.ReLU(), conv(c, c))
        self.skip = nn.Identity()  # kept as a module so the layout matches taesd.py / diffusers
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y += self.skip(x)  # in place: at 512x512 each fresh 64-channel fp32 tensor costs ~30 ms of page faults here
        return torch.relu_(y)  # self.fuse's ReLU


class Encoder(nn.Module):
    """[N, 3, H, W] image in [-1, 1] -> [N, latent_channels, H/8, W/8] latents."""

    def __init__(self, cfg: TAEConfig):
        super().__init__()
        c = cfg.channels
        layers = [conv(3, c)]
        for i, n in enumerate(cfg.num_encoder_blocks):
            if i > 0:
                layers.append(conv(c, c, stride=2, bias=False))  # each later level halves H and W
            layers += [Block(c) for _ in range(n)]
        layers.append(conv(c, cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD was trained on [0, 1] images


class Decoder(nn.Module):
    """[N, latent_channels, h, w] latents -> [N, 3, 8h, 8w] image in [-1, 1]."""

    def __init__(self, cfg: TAEConfig):
        super().__init__()
        c, last = cfg.channels, len(cfg.num_decoder_blocks) - 1
        layers = [conv(cfg.latent_channels, c), nn.ReLU()]
        for i, n in enumerate(cfg.num_decoder_blocks):
            layers += [Block(c) for _ in range(n)]
            if i < last:
                layers += [nn.Upsample(scale_factor=2), conv(c, c, bias=False)]
        layers.append(conv(c, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # soft clamp to (-3, 3): taesd.py's parameter-free Clamp() layer, outside `layers` as in diffusers
        x = torch.tanh(z / 3) * 3
        layers = list(self.layers)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Upsample):
                continue  # run with the conv after it, folded (layers.nearest_up_conv)
            if i > 0 and isinstance(layers[i - 1], nn.Upsample):
                x = nearest_up_conv(x, layer)
            else:
                x = layer(x)
        return x.mul(2).sub(1)


class TinyAutoencoder(nn.Module):
    """TAESD encoder and/or decoder; either side may be absent (encoder-only or decoder-only files)."""

    def __init__(self, cfg: TAEConfig, with_encoder: bool = True, with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if with_encoder else None
        self.decoder = Decoder(cfg) if with_decoder else None

    def encode(self, x: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """Latents of x: TAESD's encoder is deterministic, so `generator` and `sample` (AutoencoderKL's
        posterior sample) change nothing and draw nothing, as in diffusers' AutoencoderTiny."""
        if self.encoder is None:
            raise FewstepError("this tiny autoencoder has no encoder: load it with an encoder file")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise FewstepError("this tiny autoencoder has no decoder: load it with a decoder file")
        return self.decoder(z)


_TAESD_KEY = re.compile(r"(\d+)\.(.+)")


def taesd_to_diffusers(sd: dict, side: str) -> dict:
    """Rename original taesd.py keys ("3.conv.0.weight") to the AutoencoderTiny layout.

    The encoder's Sequential index is kept. The decoder's original index 0 is the parameter-free
    Clamp, which diffusers (and `Decoder.forward`) apply outside `layers`: index i becomes i - 1.
    Keys that do not match the pattern are kept as they are, so the strict check reports them.
    """
    shift = {"encoder": 0, "decoder": 1}[side]
    out = {}
    for key, value in sd.items():
        m = _TAESD_KEY.fullmatch(key)
        if m is None or int(m[1]) < shift:
            out[f"{side}:{key}"] = value  # not an original TAESD key: unexpected, named as in the file
        else:
            out[f"{side}.layers.{int(m[1]) - shift}.{m[2]}"] = value
    return out


def latent_channels(sd: dict) -> int:
    """Latent channels from tensor shapes: the decoder's first conv input, the encoder's last conv output."""
    found = set()
    if "decoder.layers.0.weight" in sd:
        found.add(sd["decoder.layers.0.weight"].shape[1])
    enc = [int(k.split(".")[2]) for k in sd if re.fullmatch(r"encoder\.layers\.\d+\.weight", k)]
    if enc:
        found.add(sd[f"encoder.layers.{max(enc)}.weight"].shape[0])
    if len(found) > 1:
        raise FewstepError(f"TAESD encoder and decoder disagree on latent channels: {sorted(found)}")
    return found.pop() if found else TAEConfig.latent_channels  # none found: the key check will report
