"""`fewstep inspect` of a LoRA file: the layers it touches, their ranks and alphas, its parameter count and
the architecture it fits, read from the safetensors header alone (no tensor is loaded, except the
one-number `.alpha` tensors of kohya files).

The architecture is told by widths, as the loader would check them: the width of the text the UNet's
cross-attention keys read (768: SD 1.x, 1024: SD 2.x, 2048: SDXL; 1280: the SDXL refiner), and whether
there are second-text-encoder layers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from ..errors import FewstepError
from ..loading.lora import KOHYA_PREFIX, UNSUPPORTED

CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}
PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
         (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"))


def is_lora(path: Path) -> bool:
    """Whether a .safetensors file holds LoRA-style weights (by its key names)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return False
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return any(k.endswith(tuple(d for d, _ in PAIRS)) or k.startswith(tuple(KOHYA_PREFIX)) for k in keys)


def layers(path: Path) -> list[dict]:
    """One row per LoRA layer: its key, component, rank, alpha, in and out features, parameters."""
    rows = []
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        for marker, kind in UNSUPPORTED.items():
            if any(marker in k for k in shapes):
                raise FewstepError(f"{path.name} is a {kind} adapter, which fewstep does not load")
        for key, shape in shapes.items():
            for down, up in PAIRS:
                if key.endswith(down) and key[: -len(down)] + up in shapes:
                    base = key[: -len(down)]
                    alpha_key = base + ".alpha"
                    alpha = f.get_tensor(alpha_key).item() if alpha_key in shapes else None
                    rows.append(dict(layer=base, component=_component(base), rank=shape[0], alpha=alpha,
                                     features=(shape[1], shapes[base + up][0]),
                                     parameters=math.prod(shape) + math.prod(shapes[base + up])))
    if not rows:
        raise FewstepError(f"{path.name}: no LoRA layers (pairs of down / up weights) in it")
    return rows


def _component(key: str) -> str:
    for prefix, component in KOHYA_PREFIX.items():
        if key.startswith(prefix):
            return component
    head = key.split(".")[0]
    return head if head in ("unet", "text_encoder", "text_encoder_2") else "unet"


def architecture(rows: list[dict]) -> str:
    """What the file fits, from the width of the text the UNet's attention keys read."""
    widths = Counter(r["features"][0] for r in rows if r["component"] == "unet" and "attn2" in r["layer"]
                     and ("to_k" in r["layer"] or "to.k" in r["layer"]))
    two = any(r["component"] == "text_encoder_2" for r in rows)
    if widths:
        width = widths.most_common(1)[0][0]
        return f"{CONTEXT.get(width, 'unknown')} (cross-attention reads {width}-wide text)"
    return "SDXL (two text encoders)" if two else "unknown (no cross-attention key layers)"


def report(path: str | Path, fmt: str = "table") -> str:
    path = Path(path)
    rows = layers(path)
    ranks, alphas = sorted({r["rank"] for r in rows}), sorted({r["alpha"] for r in rows if r["alpha"] is not None})
    summary = {"file": path.name, "fits": architecture(rows), "layers": len(rows),
               "by component": dict(Counter(r["component"] for r in rows)), "ranks": ranks,
               "alphas": alphas or "none stated (alpha = rank)", "parameters": sum(r["parameters"] for r in rows)}
    if fmt == "json":
        return json.dumps({**summary, "rows": rows}, indent=2) + "\n"
    head = [f"{k}: {v}" for k, v in summary.items()]
    table = ["| component | layer | rank | alpha | in -> out | parameters |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["layer"]):
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        table.append(f"| {r['component']} | {r['layer']} | {r['rank']} | {alpha} | {r['features'][0]} -> "
                     f"{r['features'][1]} | {r['parameters']:,} |")
    return "\n".join(head + [""] + table) + "\n"
