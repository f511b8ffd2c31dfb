"""Building a model family's components for `fewstep inspect`: each module on the meta device (no memory,
no init), with the inputs text-to-image gives it, and the name pattern of its blocks.

Inputs follow the diffusers pipelines: the UNet gets a latent, timesteps and a 77-token text context
(plus SDXL's pooled text and six size/crop ids, or LCM's guidance embedding); each text encoder 77
token ids; the decoder a latent, the encoder an image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..loading.weights import no_init
from ..models.clip import CLIPTextModel
from ..models.tae import TinyAutoencoder
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from .families import Family

CONTEXT_TOKENS = 77  # CLIP's context length: the key/value length of every cross-attention (a model whose
# text encoder has fewer positions, like shapes-turbo's 32, uses its own: `context_tokens`)
# Blocks of each component kind: name patterns over the state-dict prefixes (the subtotal level).
UNET_BLOCKS = r"conv_in|time_embedding|add_embedding|down_blocks\.\d+|mid_block|up_blocks\.\d+|conv_norm_out|conv_out"
TEXT_BLOCKS = r"text_model\.embeddings|text_model\.encoder\.layers\.\d+|text_model\.final_layer_norm|text_projection"
VAE_BLOCKS = r"{side}\.(conv_in|down_blocks\.\d+|mid_block|up_blocks\.\d+|conv_norm_out|conv_out)|{conv}"
TAE_BLOCKS = r"{side}\.layers\.\d+"


def _build(make: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"), no_init():
        return make().to(dtype).eval()


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def context_tokens(fam: Family) -> int:
    """The text context's length: the first text encoder's positions (77 for every SD family)."""
    return min((cfg.max_position_embeddings for cfg in fam.text), default=CONTEXT_TOKENS)


def _unet_inputs(cfg, b: int, h: int, w: int, dtype, tokens: int = CONTEXT_TOKENS) -> dict[str, torch.Tensor]:
    kw = dict(x=_meta(b, cfg.in_channels, h, w, dtype=dtype), t=_meta(b),
              context=_meta(b, tokens, cfg.cross_attention_dim, dtype=dtype))
    if cfg.addition_time_embed_dim is not None:  # SDXL: pooled text + 6 size/crop ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw.update(text_embeds=_meta(b, pooled, dtype=dtype), time_ids=_meta(b, 6))
    if cfg.time_cond_proj_dim is not None:  # LCM guidance embedding
        kw["timestep_cond"] = _meta(b, cfg.time_cond_proj_dim, dtype=dtype)
    return kw


class Plan(NamedTuple):
    """How to measure one component: which module, which call, on which meta inputs."""

    name: str
    role: str
    folder: str
    runs: str
    blocks: str  # name pattern of its blocks
    module: nn.Module
    call: Callable[[], object]
    inputs: dict[str, torch.Tensor]


def plans(fam: Family, res: int, batch: int, dtype: torch.dtype) -> list[Plan]:
    """The components of a family, built on the meta device, with their text-to-image inputs."""
    h = w = res // fam.latent_scale
    out = []
    if fam.unet is not None:
        unet, kw = _build(lambda: UNet(fam.unet), dtype), _unet_inputs(fam.unet, batch, h, w, dtype, context_tokens(fam))
        out.append(Plan("unet", "unet", "unet", "per step", UNET_BLOCKS, unet, lambda: unet(**kw), kw))
    for i, cfg in enumerate(fam.text):
        enc, ids = _build(lambda c=cfg: CLIPTextModel(c), dtype), _meta(batch, context_tokens(fam), dtype=torch.long)
        name, role = ("text_encoder", "text") if i == 0 else (f"text_encoder_{i + 1}", f"text_{i + 1}")
        out.append(Plan(name, role, name, "per image", TEXT_BLOCKS, enc, lambda m=enc, x=ids: m(x), {"input_ids": ids}))
    ae = fam.vae or fam.tae
    if ae is not None:
        z, image = _meta(batch, ae.latent_channels, h, w, dtype=dtype), _meta(batch, 3, res, res, dtype=dtype)
        out += _autoencoder_plans(fam, z, image, dtype)
    return out


def _autoencoder_plans(fam: Family, z: torch.Tensor, image: torch.Tensor, dtype: torch.dtype) -> list[Plan]:
    """Decoder (once per image) and encoder (img2img only) as two components of one module."""
    out = []
    if fam.vae is not None:
        vae = _build(lambda: AutoencoderKL(fam.vae), dtype)
        decoder = VAE_BLOCKS.format(side="decoder", conv="post_quant_conv")
        encoder = VAE_BLOCKS.format(side="encoder", conv="quant_conv")
        out.append(Plan("vae_decoder", "decoder", "vae", "per image", decoder, vae,
                        lambda: vae.decode(z), {"latents": z}))
        out.append(Plan("vae_encoder", "encoder", "vae", "img2img only", encoder, vae,
                        lambda: vae.encode_moments(image), {"image": image}))
    if fam.tae is not None:
        tae = _build(lambda: TinyAutoencoder(fam.tae, "encoder" in fam.tae_parts, "decoder" in fam.tae_parts), dtype)
        if "decoder" in fam.tae_parts:
            out.append(Plan("taesd_decoder", "decoder", "vae", "per image", TAE_BLOCKS.format(side="decoder"),
                            tae, lambda: tae.decode(z), {"latents": z}))
        if "encoder" in fam.tae_parts:
            out.append(Plan("taesd_encoder", "encoder", "vae", "img2img only", TAE_BLOCKS.format(side="encoder"),
                            tae, lambda: tae.encode(image), {"image": image}))
    return out
