"""Loading: a diffusers folder, an original single-file checkpoint or a hub id -> its `Components`.

- `hub`: where a model comes from (local path, the built-in model, a hub id through huggingface_hub);
- `folders`: diffusers pipeline and component folders, TAESD files;
- `single_file` + `detect` + `convert`: original LDM / SGM checkpoints, the family read from tensor
  names and shapes, keys mapped by explicit tables;
- `weights`: reading safetensors / (consented) pickles, strict key and shape checks, meta-device build;
- `dtypes`: which precision each part is kept in on which device;
- `lora`: LoRA files of every common layout, read into one form (`fewstep.adapters` applies them).
- `controlnet`: ControlNets and T2I-Adapters (diffusers folders, original single-file ControlNets), each
  checked against the UNet it will steer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .components import Components
from .dtypes import check_device
from .folders import load_autoencoder, load_folder
from .hub import resolve
from .single_file import load_single_file


def load_components(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, variant: str | None = None, allow_pickle: bool = False,
                    config: str | Path | None = None, prediction_type: str | None = None) -> Components:
    """A checkpoint's parts, built and loaded (`fewstep.pipeline.load_pipeline` makes them a Pipeline)."""
    check_device(device, dtype)
    root = resolve(path, variant)
    if root.is_file():
        return load_single_file(root, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
                                prediction_type=prediction_type)
    return load_folder(root, device, dtype, variant, allow_pickle, prediction_type)


__all__ = ["Components", "load_autoencoder", "load_components"]
