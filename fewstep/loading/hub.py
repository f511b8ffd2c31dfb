"""Where a model comes from: a local path as it is, the built-in model, or a hub id through huggingface_hub.

Only configs, tokenizers and one set of weights are fetched (`allow_patterns`), and every failure
(offline, unknown id, auth) becomes one line that says the path was not found locally either.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import FewstepError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "shapes-turbo"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Where a single-file checkpoint's tokenizers come from when no `config` folder is given (online only).
REFERENCE_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "sd2": "stabilityai/stable-diffusion-2-1-base",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def resolve(path: str | Path | None, variant: str | None = None) -> Path:
    """A local path as is; a hub id downloaded (configs, tokenizers and one set of weights)."""
    if path is None:
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise FewstepError("no default model is installed; pass a model folder, checkpoint file or hub id")
        return DEFAULT_MODEL
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not HUB_ID.match(str(path)):
        raise FewstepError(f"no such file or folder: {path}")
    return download(str(path), variant)


def download(repo: str, variant: str | None, patterns: list[str] | None = None) -> Path:
    """A hub repository's files matching `patterns` (default: a pipeline's configs and one set of weights)."""
    from huggingface_hub import snapshot_download  # lazy: imports requests and more, needed only online
    weights = f"*.{variant}.safetensors" if variant else "*/*model.safetensors"
    patterns = patterns or ["model_index.json", "fewstep.json", "*/*.json", "*/*.txt", weights,
                            "*/*.safetensors.index.json", "*/*-of-*.safetensors"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all one message for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"'{repo}' is not a local path, and downloading it from the hub failed "
                           f"(offline or unknown id): {first}") from None
