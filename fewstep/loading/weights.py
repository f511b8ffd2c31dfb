"""Reading weight files and putting them into modules without random initialisation.

Modules are built on the meta device and filled with `load_state_dict(..., assign=True)` (the
flux / nanoGPT way): no random init is computed and thrown away. Before that, the keys and shapes
are checked here so that a wrong checkpoint is reported by name, not by a torch stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import FewstepError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Buffers that old transformers checkpoints saved and fewstep recomputes; dropping them loses nothing.
IGNORED_SUFFIXES = ("position_ids",)


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"cannot read {path}: {e}") from None


def read_state_dict(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, a sharded `*.index.json`, or (only if allowed) a pickle file."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"missing weights file: {path}")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(read_state_dict(path.parent / shard, allow_pickle))
        return sd
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle)
    raise FewstepError(f"unknown weights format: {path} (expected .safetensors, or .ckpt/.pt/.bin)")


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                  "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextmanager
def no_init():
    """Skip `torch.nn.init` while modules are built: every value is overwritten by the checkpoint, and
    on the meta device `normal_` (nn.Embedding) first imports torch's Python reference kernels, which
    costs about 2 s here."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint, only with the caller's consent and only through
    `torch.load(weights_only=True)`; Lightning's nested `state_dict` is unwrapped."""
    if not allow_pickle:
        raise FewstepError(f"{path} is a pickle file: pickle checkpoints can run code; pass allow_pickle=True if you "
                           "trust it (or convert it to .safetensors)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"cannot load {path} with weights_only=True ({first}); "
                           "convert it to .safetensors with a tool you trust") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning wraps the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FewstepError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}  # drops epoch/global_step counters


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Raise a FewstepError naming every missing, unexpected or mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = want.keys() - sd.keys()
    unexpected = sd.keys() - want.keys()
    shaped = [f"{k} {tuple(sd[k].shape)} != {want[k]}" for k in want.keys() & sd.keys()
              if tuple(sd[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if shaped:
        problems.append(f"{len(shaped)} mis-shaped: {_names(shaped, 3)}")
    if problems:
        raise FewstepError(f"{what} does not match its config: " + "; ".join(problems))


def build(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str,
          device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Build `make()` on the meta device and load `sd` into it (strict, by assignment).

    A module class may define `fix_keys(sd)` to absorb known layout variants of its checkpoints
    (e.g. transformers 5 saving CLIP without the `text_model.` prefix) before the keys are checked."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    with torch.device("meta"), no_init():
        module = make()
    if hasattr(module, "fix_keys"):
        module.fix_keys(sd)
    check_keys(module, sd, what)
    sd = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def find_weights(folder: Path, stem: str, variant: str | None) -> Path:
    """The weights file of one diffusers component folder, e.g. stem 'diffusion_pytorch_model'.

    Preference: the requested variant, else plain weights, else the fp16 variant; safetensors
    before pickles; a sharded index when there is one.
    """
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        name = f"{stem}.{v}" if v else stem
        for suffix in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
            path = folder / (name + suffix)
            if path.is_file():
                return path
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise FewstepError(f"no weights in {folder}: expected {wanted}")


@torch.no_grad()
def own_memory(module: nn.Module, memory_format: torch.memory_format = torch.preserve_format) -> None:
    """Every parameter and buffer of `module` copied into memory of its own, 4-D ones in memory_format.

    Weights load memory-mapped from their safetensors file (`read_state_dict`); replacing or converting
    only some tensors would keep the file mapped for the rest, the pages already read counted in the
    process's memory beside the new copies. Copying all of a module lets the mapping go."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.clone(memory_format=memory_format if t.dim() == 4 else torch.contiguous_format)
