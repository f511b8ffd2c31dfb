"""LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as people share them,
read into one form: for each component ("unet", "text_encoder", "text_encoder_2") and each of its layers
(by fewstep's module name, which is diffusers' / transformers'), a low-rank update up @ down and its alpha.

Layouts, told apart by their key names (never by the file name):
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`
  prefixes; without a prefix: the UNet), alphas from an `adapter_config.json` beside the weights or the
  safetensors metadata diffusers writes (`lora_adapter_metadata`), else alpha = rank;
- diffusers' older layout: `<module>.lora.down.weight` / `.lora.up.weight`, or the attention processors'
  `...attn1.processor.to_q_lora.down.weight` (to_out_lora: `to_out.0`);
- kohya / A1111 (sd-scripts): `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; text encoders `lora_te_` (SD 1.x / 2.x), `lora_te1_` / `lora_te2_` (SDXL). The UNet's module
  path is diffusers' (sd-scripts trains SD 1.x / 2.x on the diffusers UNet) or the original LDM one (SDXL:
  `input_blocks_4_1_...`), mapped through the same key tables the single-file loader uses
  (`loading.convert.unet_modules`). Convolutions (LoCon: a 3x3 down, a 1x1 up) load like linear layers.
LyCORIS' LoKr / LoHa and DoRA are recognised and refused. The update is scale * alpha / rank * up @ down,
the rule of diffusers and A1111.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..configs import UNetConfig
from ..errors import FewstepError
from .convert import unet_modules
from .weights import read_state_dict

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}
UNSUPPORTED = {"lokr_w1": "LoKr", "hada_w1_a": "LoHa", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA"}


@dataclass(frozen=True)
class LoRALayer:
    down: torch.Tensor  # [rank, in] (linear) or [rank, in, kh, kw] (convolution)
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float  # the update is alpha / rank * up @ down (times the user's scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoRA:
    """One LoRA file: its layers by component and module name, and the layout it came in."""

    name: str
    layout: str  # "peft", "diffusers", "kohya"
    layers: dict[str, dict[str, LoRALayer]]
    hash: str = ""  # A1111's short hash: the first 12 hex digits of the file's sha256

    def count(self) -> int:
        return sum(len(v) for v in self.layers.values())


def _metadata(path: Path) -> dict[str, dict]:
    """Per component, the PEFT settings a diffusers / PEFT LoRA states (`lora_alpha`, `alpha_pattern`): a
    PEFT adapter_config.json beside the weights (one model: the UNet), or the safetensors metadata diffusers
    writes (`lora_adapter_metadata`: flat keys like "unet.lora_alpha")."""
    config = path.parent / "adapter_config.json"
    if config.is_file():
        return {"unet": json.loads(config.read_text())}
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    out: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field_name = key.partition(".")
        out.setdefault(component if component in COMPONENTS else "unet", {})[field_name or key] = value
    return out


def _alpha(meta: dict, module: str, rank: int) -> float:
    """A module's alpha from PEFT settings: its alpha_pattern entry (a name or a name's ending), else
    lora_alpha, else the rank (an update of up @ down exactly)."""
    for pattern, alpha in (meta.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(meta.get("lora_alpha", rank))


def lora_file(folder: Path | None, name: str) -> Path:
    """The LoRA a prompt's <lora:name> tag means: NAME.safetensors (or the one file of that stem) in `folder`."""
    if folder is None:
        raise FewstepError(f"<lora:{name}> needs a folder of LoRAs: pass --lora-dir DIR (Python: pipe.lora_dir = DIR)")
    folder = Path(folder).expanduser()
    found = sorted(p for p in folder.glob("*.safetensors") if p.stem == name) if folder.is_dir() else []
    if not found:
        raise FewstepError(f"<lora:{name}>: no {name}.safetensors in {folder}")
    return found[0]


def short_hash(path: Path) -> str:
    """A1111's "Lora hashes" value of a file: its sha256, first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def weights_file(path: Path) -> Path:
    """A LoRA file, or the one LoRA weights file of a folder (diffusers' pytorch_lora_weights.safetensors,
    PEFT's adapter_model.safetensors)."""
    if path.is_dir():
        found = [path / n for n in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
                 if (path / n).is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FewstepError(f"{path}: expected one LoRA .safetensors file, found {len(found)}")
        return found[0]
    if not path.is_file():
        raise FewstepError(f"no such LoRA file: {path}")
    return path


def read_lora(path: str | Path, modules: dict[str, nn.Module], unet_cfg: UNetConfig, name: str | None = None,
              allow_pickle: bool = False) -> LoRA:
    """Read a LoRA file for a pipeline whose components are `modules` (name -> module): every key must map
    to a layer of the right shape, or a one-line FewstepError says which do not."""
    path = weights_file(Path(path).expanduser())
    sd = read_state_dict(path, allow_pickle)
    for marker, kind in UNSUPPORTED.items():
        if any(marker in k for k in sd):
            raise FewstepError(f"{path.name} is a {kind} adapter (LyCORIS / DoRA), which fewstep does not load: "
                               "only LoRA (and LoCon) is supported")
    if any(k.startswith(tuple(KOHYA_PREFIX)) for k in sd):
        layout, grouped = "kohya", _kohya(sd, modules, unet_cfg)
    else:
        layout, grouped = _diffusers(sd, _metadata(path))
    layers = {c: {m: _checked(c, m, layer, modules) for m, layer in ls.items()} for c, ls in grouped.items()}
    lora = LoRA(name or path.stem, layout, layers, short_hash(path))
    if lora.count() == 0:
        raise FewstepError(f"{path.name} holds no LoRA layers (keys like {sorted(sd)[:2]})")
    return lora


def _checked(component: str, module: str, layer: LoRALayer, modules: dict[str, nn.Module]) -> LoRALayer:
    """The layer, after checking it fits the module it names (by shape, so a LoRA of another
    architecture is named as such)."""
    if component not in modules:
        raise FewstepError(f"the LoRA has layers for {component}, which this pipeline does not have "
                           f"({', '.join(modules)}): a LoRA for another architecture (SDXL's has text_encoder_2)")
    target = dict(modules[component].named_modules()).get(module)
    if not isinstance(target, (nn.Linear, nn.Conv2d)):
        raise FewstepError(f"the LoRA layer {component}.{module} matches no linear or convolution layer of this model")
    w = target.weight
    if layer.up.shape[1] != layer.rank:
        raise FewstepError(f"the LoRA layer {component}.{module}: rank {layer.rank} down, {layer.up.shape[1]} up")
    if layer.down.shape[1] != w.shape[1] or layer.up.shape[0] != w.shape[0]:
        raise FewstepError(f"the LoRA layer {component}.{module} maps {layer.down.shape[1]} -> {layer.up.shape[0]} "
                           f"features, the model's {w.shape[1]} -> {w.shape[0]}: a LoRA for another architecture")
    return layer


def _pairs(sd: dict, down_suffix: str, up_suffix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module key -> (down, up) for every down weight; an up weight missing is a one-line error."""
    out = {}
    for key in [k for k in sd if k.endswith(down_suffix)]:
        base = key[: -len(down_suffix)]
        if base + up_suffix not in sd:
            raise FewstepError(f"the LoRA has {key} but no {base + up_suffix}")
        out[base] = (sd[key], sd[base + up_suffix])
    return out


def _diffusers(sd: dict, meta: dict) -> tuple[str, dict]:
    """PEFT (lora_A / lora_B) or diffusers' older (lora.down / lora.up, processor.to_q_lora.down) layouts."""
    peft = any(".lora_A." in k for k in sd)
    pairs = _pairs(sd, ".lora_A.weight", ".lora_B.weight") if peft else _pairs(sd, ".down.weight", ".up.weight")
    if len(sd) != 2 * len(pairs):
        extra = sorted(k for k in sd if not k.endswith((".weight",)) or not any(k.startswith(b) for b in pairs))
        raise FewstepError(f"{len(extra)} LoRA keys are not LoRA weights fewstep knows: {', '.join(extra[:4])}")
    grouped: dict[str, dict[str, LoRALayer]] = {}
    for base, (down, up) in pairs.items():
        component, module = _split_component(base.removesuffix(".lora") if not peft else base)
        module = module.replace(".processor.", ".").replace("to_out_lora", "to_out.0").replace("_lora", "")
        alpha = _alpha(meta.get(component, {}), module, down.shape[0])
        grouped.setdefault(component, {})[module] = LoRALayer(down, up, alpha)
    return ("peft" if peft else "diffusers"), grouped


def _split_component(key: str) -> tuple[str, str]:
    for c in COMPONENTS:
        if key.startswith(c + "."):
            return c, key[len(c) + 1:]
    return "unet", key.removeprefix("base_model.model.")


def _kohya(sd: dict, modules: dict[str, nn.Module], unet_cfg: UNetConfig) -> dict:
    """sd-scripts' layout: module names with _ for ., diffusers' or the LDM UNet's."""
    pairs = _pairs(sd, ".lora_down.weight", ".lora_up.weight")
    known = {b + s for b in pairs for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    if set(sd) - known:
        extra = sorted(set(sd) - known)
        raise FewstepError(f"{len(extra)} LoRA keys are not LoRA weights fewstep knows: {', '.join(extra[:4])}")
    names = {c: _underscored(m, unet_cfg if c == "unet" else None) for c, m in modules.items()}
    grouped: dict[str, dict[str, LoRALayer]] = {}
    missing = []
    for base, (down, up) in pairs.items():
        prefix = next(p for p in KOHYA_PREFIX if base.startswith(p))
        component = KOHYA_PREFIX[prefix]
        module = names.get(component, {}).get(base[len(prefix):])
        if module is None:
            missing.append(base)
            continue
        alpha = sd[base + ".alpha"].item() if base + ".alpha" in sd else down.shape[0]
        grouped.setdefault(component, {})[module] = LoRALayer(down, up, float(alpha))
    if missing:
        raise FewstepError(f"{len(missing)} of {len(pairs)} LoRA layers match no layer of this model, e.g. "
                           f"{', '.join(missing[:3])}: a LoRA for another architecture?")
    return grouped


def _underscored(module: nn.Module, unet_cfg: UNetConfig | None) -> dict[str, str]:
    """sd-scripts' name (dots as underscores) -> module name, for every linear and convolution layer; for
    the UNet also under the original LDM names (SDXL LoRAs), through the single-file key tables."""
    layers = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {n.replace(".", "_"): n for n in layers}
    if unet_cfg is not None:
        for ldm, entry in unet_modules(unet_cfg).items():
            for param, targets in (entry[1].items() if entry else ()):
                target = f"{entry[0]}.{targets[0][0]}".removesuffix(".weight")
                if param.endswith(".weight") and target in layers:
                    out[f"{ldm}.{param[:-len('.weight')]}".replace(".", "_")] = target
    return out


def lora_arg(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); a suffix that is not a number is part of the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0

