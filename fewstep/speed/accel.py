"""Speed options that keep the numbers: channels-last layout, fused attention projections, a tiny decoder.

- channels_last: convolution weights and activations in NHWC order (PyTorch's "channels last memory
  format" tutorial); oneDNN and cuDNN run convolutions faster that way. Same maths, same outputs
  to fp32 rounding.
- fuse_qkv: one matmul for the q/k/v projections of self-attention and one for k/v of cross-
  attention (diffusers' `fuse_qkv_projections`). Done after loading, so a fused UNet's state_dict
  has `to_qkv` / `to_kv` keys instead of `to_q` / `to_k` / `to_v`; save weights before fusing.
- token_downsample=F: ToDo (Smith et al. 2024): the self-attention of the highest-resolution
  transformers takes its keys and values from F x F-pooled tokens, F^2 times fewer (queries and
  output stay at full resolution). Not exact: an approximation, most of the cost of attention at
  SD's 64x64 latents gone for a small change of the image (docs/BENCHMARKS.md measures both).
- decoder="tiny": decode with TAESD (Ollin Boer Bohan, github.com/madebyollin/taesd), a ~1M
  parameter decoder trained to mimic the SD VAE; a cheap approximation, not the same image.
  `preview_callback` uses it to show every sampler step.
- keep_memory(): glibc's allocator keeps the memory of freed tensors for the next ones instead of
  unmapping it; on CPU every fresh large tensor otherwise page-faults all its pages in again (about
  30 ms for one 64 MB activation of TAESD at 512x512 here; docs/BENCHMARKS.md). A process-wide
  setting, like PyTorch's CPU tuning advice to preload jemalloc or tcmalloc.

Everything here is a runtime choice of loading / generation (`fewstep.load(..., channels_last=True)`),
never part of a model config.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import FewstepError
from ..imaging import autoencoder_input, memory_format, to_pil
from ..loading.dtypes import vae_dtype
from ..loading.folders import load_autoencoder
from ..loading.hub import HUB_ID, download
from ..loading.weights import own_memory
from ..models.unet import Transformer2DModel
from ..pipeline import Pipeline

# Tiny decoders on the hub by latent space: SD 1.x and 2.x share one VAE, SDXL has its own.
TINY_DECODERS = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
SD_SCALING_FACTORS = (0.18215, 0.13025)  # the SD 1.x/2.x and SDXL VAEs: the latent spaces TAESD knows
TINY_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]  # the diffusers AutoencoderTiny layout


def optimize(pipe: Pipeline, *, channels_last: bool = False, fuse_qkv: bool = False,
             decoder: str | Path | None = None, token_downsample: int | None = None) -> Pipeline:
    """Apply speed options to `pipe` in place and return it. False / None leave a choice as it is.

    channels_last: UNet and autoencoder weights (and the latents passed to them) in channels-last
    layout; on CPU the decoding autoencoder is channels-last in any case (faster there). fuse_qkv:
    fused attention projections in the UNet (see module doc: changes its state_dict). decoder:
    "tiny" for the family's TAESD from the hub (or the Hugging Face cache), a path to a TAESD /
    AutoencoderTiny folder (or any autoencoder folder), the hub id of an AutoencoderTiny, or "full"
    to decode with the pipeline's own VAE again. token_downsample: ToDo's factor (2 in its paper; 1
    turns it off; see the module doc)."""
    if decoder is not None:
        pipe.decoder = load_decoder(pipe, decoder)
    if token_downsample is not None:
        pipe.token_downsample = checked_factor(token_downsample, pipe.unet)
    if fuse_qkv:
        fuse_attention(pipe.unet, pipe.token_downsample)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if pipe.device.type == "cpu":
        # On CPU the autoencoder that decodes always runs channels-last: 13% faster for the SD VAE
        # decoder at 512x512 and 30% for TAESD here (docs/BENCHMARKS.md), same results up to float
        # rounding. A full VAE left beside a tiny decoder stays as loaded (untouched, memory-mapped).
        _own_channels_last(pipe.vae if pipe.decoder is None else pipe.decoder)
    elif memory_format(pipe.unet) == torch.channels_last:  # also when only a new decoder came in
        for m in (pipe.vae, pipe.decoder):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    return pipe


def _own_channels_last(m: nn.Module) -> None:
    """All of a (small) autoencoder copied channels-last into memory of its own (`weights.own_memory`:
    converting only its conv weights would keep the weight file mapped). Already converted: nothing to do."""
    if memory_format(m) != torch.channels_last:
        own_memory(m, torch.channels_last)


def checked_factor(factor, unet: nn.Module) -> int:
    """A ToDo pooling factor `unet` can run, or a one-line error."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise FewstepError(f"token downsampling factor {factor!r}: use a whole number >= 1 (2 pools 2x2 tokens; 1 is off)")
    fused = any(b.attn1.to_qkv is not None for t in unet.modules() if isinstance(t, Transformer2DModel)
                and t.pools_tokens for b in t.transformer_blocks)
    if factor > 1 and fused:
        raise FewstepError("token downsampling cannot start after the q/k/v projections were fused: "
                           "load the model again and pass both options together")
    return factor


def fuse_attention(unet: nn.Module, token_downsample: int = 1) -> nn.Module:
    """Fuse every transformer block's projections: q/k/v of attn1 (k/v when its keys come from
    elsewhere: the text in SDXS-style `only_cross` blocks, pooled tokens where `token_downsample` > 1
    will pool them), k/v of attn2."""
    for t in unet.modules():
        if isinstance(t, Transformer2DModel):
            pooled = t.pools_tokens and token_downsample > 1
            for block in t.transformer_blocks:
                block.attn1.fuse_projections(self_attention=not block.only_cross and not pooled)
                block.attn2.fuse_projections(self_attention=False)
    return unet


def load_decoder(pipe: Pipeline, decoder: str | Path) -> nn.Module | None:
    """The module `pipe` should decode with for `decoder` ("full" -> None: its own VAE), on the
    pipeline's device, in the dtype its VAE would have (see `loading.dtypes.vae_dtype`)."""
    if decoder == "full":
        return None
    scale = getattr(pipe.vae.cfg, "scaling_factor", None)
    if decoder == "tiny" and scale not in SD_SCALING_FACTORS:
        raise FewstepError(f"decoder='tiny' is TAESD, for SD 1.x/2.x/XL latents; this VAE (scaling_factor={scale}) "
                           "has another latent space: pass decoder=<path to a tiny decoder trained for it>")
    sdxl = pipe.conditioning.time_ids  # an SDXL pipeline: SDXL's latent space
    source = TINY_DECODERS["sdxl" if sdxl else "sd"] if decoder == "tiny" else str(decoder)
    path = Path(source).expanduser()
    if not path.exists():
        if not HUB_ID.match(source):
            raise FewstepError(f"decoder={source!r}: expected 'tiny', 'full', a TAESD folder or a hub id")
        try:
            path = download(source, None, TINY_FILES)
        except FewstepError:
            raise FewstepError(f"decoder={str(decoder)!r} needs {source}, which is not in the Hugging Face cache and "
                               "could not be downloaded (offline?): pass decoder=<path to a TAESD folder>") from None
    ae = load_autoencoder(path, device=pipe.device, sdxl=sdxl)  # fp32 first: the dtype rule reads its config
    return ae.to(vae_dtype(ae.cfg, pipe.dtype, pipe.device, sdxl))


def preview_callback(ae: nn.Module, on_image: Callable) -> Callable:
    """A sampler callback that decodes each step's x0 estimate with `ae` (TAESD: cheap) and calls
    `on_image(i, image)` with one PIL image, the batch side by side. Use as `pipe(..., callback=...)`."""
    def callback(i: int, x: torch.Tensor, denoised: torch.Tensor, sigma) -> None:
        with torch.no_grad():
            images = ae.decode(autoencoder_input(ae, denoised))  # [N, 3, H, W]
        on_image(i, to_pil(torch.cat(list(images), dim=-1)[None])[0])  # [1, 3, H, N * W]
    return callback


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_memory() -> bool:
    """Make this process's glibc malloc serve large blocks from its heap (no mmap per tensor) and keep
    freed memory (trim only above 2 GiB free), so the memory of freed tensors is reused without page
    faults (a model's activations: from its second call on). Process-wide and not undone; returns
    False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
