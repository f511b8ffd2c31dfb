"""The sizes of shapes-turbo's models and the default settings of each training stage, for the
shipped model ("full") and for the smoke runs of the tests ("tiny": minutes for the whole recipe).

Sizes are chosen for a 2-core CPU: a 1-step 128x128 image (text encoder + one UNet evaluation
at 16x16 + VAE decode) must take under 0.1 s, and the whole recipe under 2 hours. The costly
part at full resolution is the VAE, so its top level is 8 channels wide; the UNet works at 16, 8
and 4 latent pixels with attention on the lower two.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import UNetConfig, VAEConfig
from .loop import Hyper


@dataclass(frozen=True)
class Sizes:
    image: int  # training image side (the renderer's `size`)
    context: int  # text tokens (BOS + caption + EOS + padding): the tokenizer's model_max_length and
    # the text encoder's positions. The longest caption of the grammar is 23 tokens; with SD's 77 the
    # tuned text layers and every cross-attention ran over 54 positions of padding (docs/log/2026-11-23-32-text-tokens.md).
    text: dict  # CLIPTextConfig fields; vocab size and token ids come from the trained tokenizer
    tower: tuple[int, ...]  # channels of the CLIP image tower's stride-2 convs
    embed: int  # CLIP joint embedding width
    vae: VAEConfig
    unet: UNetConfig


def _unet(channels, attention, heads, context, groups, sample) -> UNetConfig:
    n = len(channels)
    return UNetConfig(block_out_channels=channels, down_attention=attention, up_attention=attention[::-1],
                      layers_per_block=(1,) * n, transformer_depth=(1,) * n, num_heads=heads,
                      only_cross_attention=(False,) * n, cross_attention_dim=context, use_linear_projection=True,
                      norm_num_groups=groups, sample_size=sample)


FULL = Sizes(
    image=128,
    context=32,
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    tower=(16, 32, 64, 128), embed=128,
    vae=VAEConfig(block_out_channels=(8, 16, 32, 64), layers_per_block=1, norm_num_groups=1, force_upcast=False),
    unet=_unet((32, 64, 128), (False, True, True), (1, 2, 4), context=128, groups=8, sample=16),
)

TINY = Sizes(
    image=64,
    context=32,
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    tower=(4, 8, 8, 16), embed=16,
    vae=VAEConfig(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=1, force_upcast=False),
    unet=_unet((8, 16), (False, True), (1, 2), context=32, groups=4, sample=8),
)

# Per-stage defaults. Steps are optimiser steps; batch is the global batch. The UNet stages run as 2 data-parallel
# processes on the CPU (one on a GPU): the recipe in under 2 hours on a 2-core CPU (docs/training.md).
SETTINGS = {
    "full": {
        "clip": Hyper(steps=800, batch=128, lr=1e-3, warmup=100),
        "vae": Hyper(steps=3000, batch=16, lr=1e-3, warmup=100),
        "teacher": Hyper(steps=2000, batch=32, lr=5e-4, warmup=200, workers=1, preview_every=500, processes=2),
        "refine": Hyper(steps=5000, batch=32, lr=6e-4, warmup=200, workers=1, preview_every=500, text_layers=4,
                        offset_noise=0.1, processes=2),
        "pairs": Hyper(steps=2000, batch=32, lr=2e-4, warmup=200, workers=1, preview_every=500, text_layers=4,
                       offset_noise=0.1, two_objects=0.8, caption_drop=0.15, processes=2),
        "swap": Hyper(steps=2000, batch=32, lr=2e-4, warmup=200, workers=1, preview_every=500, text_layers=4,
                      offset_noise=0.1, two_objects=0.8, caption_drop=0.15, swap=1.0, processes=2),
        "student": Hyper(steps=3000, batch=32, lr=1e-4, warmup=50, workers=1, preview_every=250, pool=True,
                         backward=1.0, processes=2),
    },
    "tiny": {
        "clip": Hyper(steps=6, batch=8, lr=1e-3, warmup=2, log_every=2, ckpt_every=3),
        "vae": Hyper(steps=6, batch=4, lr=1e-3, warmup=2, log_every=2, ckpt_every=3),
        "teacher": Hyper(steps=6, batch=4, lr=1e-3, warmup=2, log_every=2, ckpt_every=3, preview_every=6),
        "refine": Hyper(steps=6, batch=4, lr=1e-4, warmup=2, log_every=2, ckpt_every=3, preview_every=6,
                        text_layers=1, offset_noise=0.1),
        "pairs": Hyper(steps=6, batch=4, lr=1e-4, warmup=2, log_every=2, ckpt_every=3, preview_every=6,
                       text_layers=1, offset_noise=0.1, two_objects=0.8, caption_drop=0.15),
        "swap": Hyper(steps=6, batch=4, lr=1e-4, warmup=2, log_every=2, ckpt_every=3, preview_every=6,
                      text_layers=1, offset_noise=0.1, two_objects=0.8, caption_drop=0.15, swap=1.0),
        "student": Hyper(steps=6, batch=4, lr=1e-4, warmup=2, log_every=2, ckpt_every=3, preview_every=6,
                         pool=True, backward=1.0),
    },
}


def sizes(tiny: bool) -> Sizes:
    return TINY if tiny else FULL
