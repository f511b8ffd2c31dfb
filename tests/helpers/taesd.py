"""diffusers' AutoencoderTiny filled with the original TAESD files: the oracle of the TAESD tests."""

from torch import nn

from helpers.env import SHARED

TAESD = SHARED / "taesd"


def diffusers_with_original_weights(prefix: str):
    """The oracle: diffusers AutoencoderTiny filled from the original files by Sequential index.
    diffusers keeps taesd.py's Clamp (original index 0) outside `decoder.layers`, so a placeholder
    module stands in for it here; everything else is loaded into diffusers' own modules unchanged."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file
    ref = AutoencoderTiny().eval()
    ref.encoder.layers.load_state_dict(load_file(TAESD / f"{prefix}_encoder.safetensors"), strict=True)
    nn.Sequential(nn.Identity(), *ref.decoder.layers).load_state_dict(
        load_file(TAESD / f"{prefix}_decoder.safetensors"), strict=True)
    return ref
