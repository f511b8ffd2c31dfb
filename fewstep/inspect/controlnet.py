"""`fewstep inspect` of a ControlNet or T2I-Adapter folder: its parts and their parameters, beside the same
parts of the UNet it attaches to (for a ControlNet: the down and mid blocks it copies), built on the meta
device from the config alone (no weights are read).

Follows the layout of diffusers' `ControlNetModel` / `T2IAdapter` (fewstep.models.controlnet / t2i_adapter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..configs import read_json
from ..errors import FewstepError
from ..loading.weights import no_init
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.t2i_adapter import AdapterConfig, T2IAdapter
from ..models.unet import UNet
from .report import table

KINDS = ("ControlNetModel", "T2IAdapter")


def is_control(path: Path) -> bool:
    """Whether `path` is a diffusers ControlNetModel or T2IAdapter folder."""
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("_class_name") in KINDS


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _parts(module: nn.Module) -> dict[str, nn.Module]:
    """Top-level children, with block lists split into their blocks (down_blocks.0, ...)."""
    out = {}
    for name, child in module.named_children():
        blocks = name in ("down_blocks", "up_blocks", "body")
        out.update({f"{name}.{i}": b for i, b in enumerate(child)} if blocks else {name: child})
    return out


def rows(path: Path) -> tuple[str, list[dict]]:
    """(what it is, one row per part: part, parameters, the attached UNet's parameters for that part or None)."""
    d = read_json(Path(path) / "config.json")
    with torch.device("meta"), no_init():
        if d.get("_class_name") == "T2IAdapter":
            cfg = AdapterConfig.from_diffusers(d)
            adapter = T2IAdapter(cfg)
            feats = ", ".join(f"{cout}@/{cfg.downscale_factor * 2 ** sum(b[2] for b in cfg.blocks[:i + 1])}"
                              for i, (_, cout, _) in enumerate(cfg.blocks))
            what = f"T2I-Adapter ({d.get('adapter_type', 'full_adapter')}); features (width@/pixels): {feats}"
            return what, [dict(part=k, parameters=_count(m), unet=None) for k, m in _parts(adapter.adapter).items()]
        if d.get("_class_name") != "ControlNetModel":
            raise FewstepError(f"{path} is not a ControlNetModel or T2IAdapter folder")
        cfg = ControlNetConfig.from_diffusers(d)
        net, unet = ControlNet(cfg), UNet(cfg.unet)
    base = _parts(unet)
    out = [dict(part=k, parameters=_count(m), unet=_count(base[k]) if k in base else None)
           for k, m in _parts(net).items() if m is not None]
    out += [dict(part=k, parameters=None, unet=_count(m)) for k, m in base.items()
            if k not in dict(net.named_children()) and not k.startswith("down_blocks") and m is not None]
    u = cfg.unet
    what = (f"ControlNet for a UNet of blocks {u.block_out_channels}, cross_attention_dim {u.cross_attention_dim}"
            f"{', SDXL add-embedding' if u.addition_time_embed_dim else ''}")
    return what, out


def report(path: str | Path, fmt: str = "table") -> str:
    """The parts table of a ControlNet / T2I-Adapter folder, as text, Markdown or JSON."""
    path = Path(path)
    what, parts = rows(path)
    total = sum(r["parameters"] or 0 for r in parts)
    unet = sum(r["unet"] or 0 for r in parts)
    if fmt == "json":
        return json.dumps({"model": path.name, "is": what, "parameters": total, "unet parameters": unet or None,
                           "rows": parts}, indent=1) + "\n"
    show = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    body = [[r["part"], show(r["parameters"]), show(r["unet"])] for r in parts]
    body.append(["total", f"{total:,}", show(unet or None)])
    beside = f" (the UNet it attaches to: {unet:,})" if unet else ""
    head = f"{path.name}: {what}\nparameters: {total:,}{beside}\n\n"
    return head + table(["part", "params", "UNet params"], body, md=fmt == "md") + "\n"
