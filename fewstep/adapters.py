"""LoRAs applied to a pipeline's modules, any number stacked, each with its own scale.

Unfused, each targeted linear or convolution layer gets one forward hook that adds, for every active
LoRA, scale * alpha / rank * up(down(x)): the weights stay untouched, so removing a LoRA restores the
model bit for bit, and scales change without work. Fused, the updates are added into the weights
(no cost per step) after the touched weights are kept aside, so unfusing puts back the very same
tensors. Readers of the files are in `fewstep.loading.lora`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FewstepError


def _update(layer, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA's dense update of a weight, alpha / rank * up @ down, in the weight's shape and dtype."""
    down, up = layer.down.to(torch.float32), layer.up.to(torch.float32)
    delta = up.flatten(1) @ down.flatten(1)  # [out, in * kh * kw]
    return (delta.view(weight.shape) * (layer.alpha / layer.rank)).to(weight.dtype)


class Adapters:
    """The LoRAs of one pipeline: name -> (LoRA, scale); the hooks that apply them; the fused state."""

    def __init__(self):
        self.loras: dict[str, tuple[object, float]] = {}
        self.targets: dict[tuple[str, str], nn.Module] = {}  # (component, module name) -> layer
        self.hooks = {}
        self.saved: dict[tuple[str, str], torch.Tensor] | None = None  # fused: the original weights

    def scales(self) -> dict[str, float]:
        return {name: scale for name, (_, scale) in self.loras.items()}

    def add(self, lora, scale: float, modules: dict[str, nn.Module]) -> None:
        """Attach `lora` (a `loading.lora.LoRA`) at `scale`; its layers' weights move to each target's device
        and dtype. Nothing changes when this raises."""
        if lora.name in self.loras:
            raise FewstepError(f"a LoRA named {lora.name!r} is loaded already: give another name, or unload it")
        self._refuse_fused("load another LoRA")
        named = {c: dict(m.named_modules()) for c, m in modules.items()}
        targets = {(c, n): named[c][n] for c, layers in lora.layers.items() for n in layers}
        moved = {c: {n: type(layer)(*(t.to(targets[c, n].weight.device, targets[c, n].weight.dtype)
                                       for t in (layer.down, layer.up)), layer.alpha)
                     for n, layer in layers.items()} for c, layers in lora.layers.items()}
        self.loras[lora.name] = (type(lora)(lora.name, lora.layout, moved, lora.hash), checked_scale(scale))
        for key, module in targets.items():
            self.targets[key] = module
            if key not in self.hooks:
                self.hooks[key] = module.register_forward_hook(self._hook(key))

    def _hook(self, key: tuple[str, str]):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.saved is not None:  # fused into the weights
                return out
            x = args[0]
            for lora, scale in self.loras.values():
                layer = lora.layers.get(key[0], {}).get(key[1])
                if layer is not None and scale:
                    out = out + _apply(module, layer, x) * (scale * layer.alpha / layer.rank)
            return out
        return hook

    def remove(self, name: str | None) -> None:
        """Unload one LoRA (or all with None); hooks no LoRA needs any more go too."""
        if name is not None and name not in self.loras:
            raise FewstepError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        if self.saved is not None:
            self.unfuse()
        for n in list(self.loras) if name is None else [name]:
            del self.loras[n]
        used = {(c, m) for lora, _ in self.loras.values() for c, layers in lora.layers.items() for m in layers}
        for key in [k for k in self.hooks if k not in used]:
            self.hooks.pop(key).remove()
            self.targets.pop(key)

    def set_scale(self, name: str, scale: float) -> None:
        if name not in self.loras:
            raise FewstepError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        self._refuse_fused("change a scale")
        self.loras[name] = (self.loras[name][0], checked_scale(scale))

    @torch.no_grad()
    def fuse(self) -> None:
        """Add every LoRA's update, at its scale, into the weights; keep the originals for `unfuse`."""
        if self.saved is not None or not self.loras:
            return
        self.saved = {key: m.weight.detach().clone() for key, m in self.targets.items()}
        for key, m in self.targets.items():
            for lora, scale in self.loras.values():
                layer = lora.layers.get(key[0], {}).get(key[1])
                if layer is not None and scale:
                    m.weight.add_(_update(layer, m.weight) * scale)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put the original weights back, the very same values."""
        if self.saved is None:
            return
        for key, w in self.saved.items():
            self.targets[key].weight.copy_(w)
        self.saved = None

    def _refuse_fused(self, what: str) -> None:
        if self.saved is not None:
            raise FewstepError(f"the LoRAs are fused into the weights: unfuse_lora() before you {what}")


def _apply(module: nn.Module, layer, x: torch.Tensor) -> torch.Tensor:
    """up(down(x)) for a linear layer, or for a convolution (down with the layer's stride and padding)."""
    if isinstance(module, nn.Conv2d):
        h = F.conv2d(x, layer.down, None, module.stride, module.padding, module.dilation)
        return F.conv2d(h, layer.up)
    return F.linear(F.linear(x, layer.down), layer.up)


def checked_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise FewstepError(f"LoRA scale {scale!r} must be a finite number")
    return float(scale)
