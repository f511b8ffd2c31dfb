"""The KL-regularised autoencoder that maps images to Stable Diffusion's latent space and back.

Follows Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(CompVis `ldm/models/autoencoder.py`, `AutoencoderKL`); module names are diffusers' `AutoencoderKL`
state-dict keys, so a diffusers `vae/` folder loads with `strict=True`. `encode` / `decode` speak
the *diffusion* latent space: raw latents shifted by `shift_factor` and scaled by `scaling_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import VAEConfig
from ..noise import randn
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, VAEAttention

EPS = 1e-6  # every VAE norm uses this eps, whatever the UNet uses


class MidBlock(nn.Module):
    """Resnet, single-head self-attention (optional per config), resnet, at the lowest resolution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, g = cfg.block_out_channels[-1], cfg.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock2D(c, c, None, g, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(c, g, EPS)] if cfg.mid_block_add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv except at the last level."""

    def __init__(self, cin: int, c: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if j == 0 else c, c, None, groups, EPS) for j in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(c, asymmetric=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D: resnets, then nearest x2 + conv except at the last (full-size) level."""

    def __init__(self, cin: int, c: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if j == 0 else c, c, None, groups, EPS) for j in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(c)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image [N, 3, H, W] -> mean and log-variance stacked on channels [N, 2 * latent, H/8, W/8]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        boc, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n))
        self.mid_block = MidBlock(cfg)
        self.conv_norm_out = nn.GroupNorm(g, boc[-1], eps=EPS)
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Raw latent [N, latent, h, w] -> image [N, 3, 8h, 8w]; one more resnet per level than the encoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(cfg)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE. Images are [N, 3, H, W] in [-1, 1]; latents are in diffusion space."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if cfg.use_post_quant_conv else None

    @property
    def shift(self) -> float:
        return self.cfg.shift_factor or 0.0

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance in the raw latent space, each [N, latent, H/8, W/8]."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def encode(self, x: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """Diffusion-space latents of x: the posterior mean, or a draw from it when `sample`.

        The noise is drawn as diffusers' `latent_dist.sample(generator)` draws it (`noise.randn`: on the
        generator's device, in the latents' dtype; a list of generators draws image i from generator i, and
        turns one image into as many samples as there are generators)."""
        mean, logvar = (m.to(x.dtype) for m in self.encode_moments(x))  # autocast: back to the input's dtype
        z = mean
        if sample:
            shape = (len(generator), *mean.shape[1:]) if isinstance(generator, list) else tuple(mean.shape)
            z = mean + torch.exp(0.5 * logvar) * randn(shape, generator, mean.dtype, mean.device)  # [1] -> [n]
        return (z - self.shift) * self.cfg.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (roughly in [-1, 1]) from diffusion-space latents z."""
        z = z / self.cfg.scaling_factor + self.shift
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
