"""fewstep: a compact, readable PyTorch engine for fast few-step text-to-image latent diffusion.

    import fewstep
    pipe = fewstep.load("path/to/model")          # diffusers folder, single-file checkpoint or hub id
    images = pipe("a photo of a cat", steps=1, guidance=0.0, seed=0)
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a text-to-image pipeline; see `fewstep.loading.load`."""
    from .loading import load as _load
    return _load(*args, **kwargs)


def load_autoencoder(*args, **kwargs):
    """Load an autoencoder (AutoencoderKL, AutoencoderTiny or TAESD files); see `fewstep.loading`."""
    from .loading import load_autoencoder as _load_autoencoder
    return _load_autoencoder(*args, **kwargs)
