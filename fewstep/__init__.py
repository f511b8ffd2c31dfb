"""fewstep: a compact, readable PyTorch engine for fast few-step text-to-image latent diffusion.

    import fewstep
    pipe = fewstep.load("path/to/model")          # diffusers folder, single-file checkpoint or hub id
    images = pipe("a photo of a cat", steps=1, guidance=0.0, seed=0)

docs/ARCHITECTURE.md draws the packages and the path of one prompt through them.
"""

from .api import load, load_autoencoder
from .errors import FewstepError
from .pipeline import Pipeline
from .version import __version__

__all__ = ["FewstepError", "Pipeline", "__version__", "load", "load_autoencoder"]
