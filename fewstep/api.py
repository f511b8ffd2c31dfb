"""`fewstep.load`: a pipeline from a checkpoint, with the speed options applied (the public entry point)."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import load_autoencoder
from .pipeline import Pipeline, load_pipeline
from .speed.accel import optimize


def load(path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         variant: str | None = None, allow_pickle: bool = False, config: str | Path | None = None,
         prediction_type: str | None = None, channels_last: bool = False, fuse_qkv: bool = False,
         decoder: str | Path | None = None, token_downsample: int | None = None,
         controlnet: str | Path | list[str | Path] | None = None) -> Pipeline:
    """Load a text-to-image pipeline.

    path: a diffusers folder, a single-file checkpoint (.safetensors; .ckpt only with allow_pickle), a hub
    id, or None for the built-in default model. config: for single files, a diffusers folder whose
    configs and tokenizers to use (as diffusers' `from_single_file(config=...)`); prediction_type
    overrides the scheduler's (e.g. "v_prediction" for SD 2.x 768-v single files).

    dtype applies to the UNet and text encoders; an fp16 pipeline keeps a `force_upcast` VAE in fp32 on
    a CPU, and on a GPU for SDXL only, as diffusers does (`loading.dtypes.vae_dtype`). channels_last,
    fuse_qkv, decoder ("tiny", "full" or a TAESD folder) and token_downsample (ToDo's factor, e.g. 2)
    are the speed options of `fewstep.speed.accel.optimize`. controlnet: ControlNets / T2I-Adapters to steer
    with (a path or hub id, or a list; `Pipeline.load_controlnet`, docs/controlnet.md); each call then takes
    one control_image per model."""
    pipe = load_pipeline(path, device=device, dtype=dtype, variant=variant, allow_pickle=allow_pickle, config=config,
                         prediction_type=prediction_type)
    if controlnet is not None:
        pipe.load_controlnet(controlnet, variant=variant, allow_pickle=allow_pickle)
    return optimize(pipe, channels_last=channels_last, fuse_qkv=fuse_qkv, decoder=decoder,
                    token_downsample=token_downsample)


__all__ = ["load", "load_autoencoder"]
