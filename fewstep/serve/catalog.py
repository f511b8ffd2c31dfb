"""What a client may choose: the checkpoints (the built-in models and those in --models-dir) and the LoRAs
(in --lora-dir), listed as A1111's /sd-models and /loras list them.

A client names a model; it never gives a path. A name is looked up in the listing, so `..`, absolute
paths and files outside the folder (a symlink out of it included) are refused, and only .safetensors
files and diffusers folders are listed: no pickle is ever loaded through the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FewstepError
from ..loading.hub import ASSETS

BUILT_IN = ("shapes-turbo", "shapes-teacher")


@dataclass(frozen=True)
class Checkpoint:
    title: str  # A1111's sd_model_checkpoint value: the file name (a folder's name)
    model_name: str  # the name without its suffix
    path: Path

    def a1111(self) -> dict:
        """The row of /sdapi/v1/sd-models (fewstep computes no hashes: reading GBs per listing is too slow)."""
        return {"title": self.title, "model_name": self.model_name, "hash": None, "sha256": None,
                "filename": str(self.path), "config": None}


def checkpoints(models_dir: Path | None) -> list[Checkpoint]:
    """The built-in models, then the .safetensors files and diffusers folders directly in `models_dir`."""
    found = [Checkpoint(n, n, ASSETS / n) for n in BUILT_IN if (ASSETS / n / "model_index.json").is_file()]
    if models_dir is None or not Path(models_dir).is_dir():
        return found
    root = Path(models_dir).resolve()
    for p in sorted(Path(models_dir).iterdir()):
        inside = p.resolve().is_relative_to(root)
        if inside and p.is_file() and p.suffix == ".safetensors":
            found.append(Checkpoint(p.name, p.stem, p))
        elif inside and (p / "model_index.json").is_file():
            found.append(Checkpoint(p.name, p.name, p))
    return found


def find(name: str, models_dir: Path | None) -> Checkpoint:
    """The checkpoint a client's name means: a title or model name of the listing (an A1111 title's
    ` [hash]` tail is dropped). Paths are refused with their own message."""
    if not isinstance(name, str) or not name.strip():
        raise FewstepError("sd_model_checkpoint must be a model name from /sdapi/v1/sd-models")
    key = name.strip().split(" [")[0]
    if ".." in Path(key).parts or Path(key).is_absolute() or "/" in key or "\\" in key:
        raise FewstepError(f"model {name!r}: give a model's name from /sdapi/v1/sd-models, not a path")
    listing = checkpoints(models_dir)
    for c in listing:
        if key in (c.title, c.model_name):
            return c
    raise FewstepError(f"unknown model {name!r}; choose one of: {', '.join(c.title for c in listing)}")


def loras(lora_dir: Path | None) -> list[dict]:
    """The rows of /sdapi/v1/loras: the .safetensors files of `lora_dir` (what <lora:name:scale> loads)."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return []
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
            for p in sorted(Path(lora_dir).glob("*.safetensors"))]
