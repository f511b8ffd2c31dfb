"""Model definitions in plain PyTorch; attribute names follow the diffusers / transformers layouts."""
