"""Random LoRA files in each layout people share (written by the tests; nothing downloaded): diffusers /
PEFT keys with diffusers' alpha metadata, kohya / A1111 keys under diffusers' module names (sd-scripts'
SD 1.x / 2.x) or the original LDM ones (its SDXL), LoCon convolutions included."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fewstep.loading.convert import unet_modules

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")


def layers_of(module: nn.Module, ends: tuple[str, ...], convs: bool = False) -> dict[str, nn.Module]:
    """The module's linear layers whose names end in `ends` (and, with `convs`, its resnets' convolutions)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(ends):
            out[name] = m
        elif convs and isinstance(m, nn.Conv2d) and ".resnets." in name and name.endswith(("conv1", "conv2")):
            out[name] = m
    return out


def random_lora(components: dict[str, nn.Module], rank: int = 4, seed: int = 0, convs: bool = False,
                strength: float = 0.3) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> module name -> (down, up), big enough to change images visibly."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, module in components.items():
        ends = ATTENTION if component == "unet" else TEXT
        for name, m in layers_of(module, ends, convs and component == "unet").items():
            if isinstance(m, nn.Conv2d):  # LoCon: a kxk down with the layer's kernel, a 1x1 up
                down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
                up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
            else:
                down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
            scale = strength / (down[0].numel() ** 0.5 * rank ** 0.5)
            out.setdefault(component, {})[name] = (down * scale, up)
    return out


def write_peft(path: Path, lora: dict, alphas: dict[str, float] | None = None) -> Path:
    """diffusers' save_lora_weights layout: `unet.<m>.lora_A.weight`, alphas in the safetensors metadata."""
    sd = {f"{c}.{m}.lora_{ab}.weight": t.contiguous() for c, layers in lora.items() for m, (down, up) in layers.items()
          for ab, t in (("A", down), ("B", up))}
    meta = {f"{c}.{k}": v for c, a in (alphas or {}).items()
            for k, v in (("lora_alpha", a), ("r", next(iter(lora[c].values()))[0].shape[0]),
                         ("target_modules", sorted({m.rsplit(".", 2 if m.endswith(".0") else 1)[-1] if not
                                                    m.endswith(".0") else "to_out.0" for m in lora[c]})))}
    save_file(sd, str(path), metadata={"format": "pt", **({"lora_adapter_metadata": json.dumps(meta)} if meta else {})})
    return path


def ldm_names(unet_cfg) -> dict[str, str]:
    """diffusers module name -> the original LDM one, from the single-file key tables."""
    out = {}
    for ldm, entry in unet_modules(unet_cfg).items():
        for param, targets in (entry[1].items() if entry else ()):
            if param.endswith(".weight"):
                out[f"{entry[0]}.{targets[0][0]}".removesuffix(".weight")] = f"{ldm}.{param.removesuffix('.weight')}"
    return out


def write_kohya(path: Path, lora: dict, alpha: float, ldm: dict[str, str] | None = None, sdxl: bool = False) -> Path:
    """sd-scripts' layout: `lora_unet_<m with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`; `lora_te_`,
    or `lora_te1_` / `lora_te2_` for SDXL; the UNet under LDM names when `ldm` maps them."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    sd = {}
    for c, layers in lora.items():
        for m, (down, up) in layers.items():
            key = prefix[c] + ((ldm or {}).get(m, m) if c == "unet" else m).replace(".", "_")
            sd.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                       f"{key}.alpha": torch.tensor(float(alpha))})
    save_file(sd, str(path))
    return path
