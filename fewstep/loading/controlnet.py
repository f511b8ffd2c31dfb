"""Loading ControlNets and T2I-Adapters: diffusers `ControlNetModel` / `T2IAdapter` folders, and the
original single-file ControlNets (lllyasviel's `control_v11p_sd15_canny` layout: `control_model.`-prefixed
or bare LDM keys), each checked against the UNet it will steer before it is kept.

Follows diffusers' `ControlNetModel.from_pretrained` / `T2IAdapter.from_pretrained` and, for single files,
`loaders/single_file_utils.py` (`convert_controlnet_checkpoint`), with the UNet's key table
(`convert.unet_modules`) for the copied down and mid blocks plus one explicit table for the parts only a
ControlNet has: `input_hint_block` -> `controlnet_cond_embedding`, `zero_convs` -> `controlnet_down_blocks`,
`middle_block_out` -> `controlnet_mid_block`. A single file carries no config: its structure is the base
UNet's (heads, projections, norms), with what the weights do say read from their shapes. Recognised and
refused: Stability's control-LoRAs, original T2I-Adapter files, diffusers-layout files without config.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..configs import UNetConfig, read_json
from ..errors import FewstepError
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.t2i_adapter import AdapterConfig, T2IAdapter
from .convert import PARAM, Modules, materialize, plan, unet_modules
from .hub import HUB_ID, download
from .weights import build, find_weights, read_state_dict

LDM_PREFIXES = ("control_model.", "")  # lllyasviel's files (control_model.*) and bare copies (thibaud's SD 2.1)


def load_control(path: str | Path, base: UNetConfig, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, variant: str | None = None, allow_pickle: bool = False,
                 vae_scale: int = 8) -> ControlNet | T2IAdapter:
    """A ControlNet or T2I-Adapter (a diffusers folder, a hub id, or an original single ControlNet file) for
    a pipeline whose UNet has config `base` and `vae_scale` pixels per latent; a FewstepError when it is
    not one, cannot be read, or was made for another base model."""
    root = _resolve(path, variant)
    if root.is_file():
        cfg, sd = read_single_file(root, base, allow_pickle)
        check_controlnet(cfg, base, root.name)
        return build(lambda: ControlNet(cfg), sd, f"ControlNet {root.name}", device, dtype)
    d = read_json(root / "config.json")
    kind = d.get("_class_name")
    sd = read_state_dict(find_weights(root, "diffusion_pytorch_model", variant), allow_pickle)
    if kind == "ControlNetModel":
        cfg = ControlNetConfig.from_diffusers(d)
        check_controlnet(cfg, base, root.name)
        return build(lambda: ControlNet(cfg), sd, f"ControlNet in {root}", device, dtype)
    if kind == "T2IAdapter":
        acfg = AdapterConfig.from_diffusers(d)
        check_adapter(acfg, base, vae_scale, root.name)
        return build(lambda: T2IAdapter(acfg), sd, f"T2I-Adapter in {root}", device, dtype)
    raise FewstepError(f"{root} holds a {kind or 'model without _class_name'}, not a ControlNetModel or T2IAdapter "
                       "(MultiAdapter folders: load each adapter on its own)")


def _resolve(path: str | Path, variant: str | None) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not HUB_ID.match(str(path)):
        raise FewstepError(f"no such ControlNet / T2I-Adapter file or folder: {path}")
    weights = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    return download(str(path), variant, ["config.json", weights])


def check_controlnet(cfg: ControlNetConfig, base: UNetConfig, name: str) -> None:
    """One line when a ControlNet was made for another base model (other widths, text width or add-embedding)."""
    u = cfg.unet
    mine = (u.block_out_channels, u.layers_per_block, u.cross_attention_dim,
            u.projection_class_embeddings_input_dim)
    theirs = (base.block_out_channels, base.layers_per_block, base.cross_attention_dim,
              base.projection_class_embeddings_input_dim)
    if mine != theirs or u.in_channels != base.out_channels:
        raise FewstepError(f"ControlNet {name} is for another base model: blocks {u.block_out_channels}, "
                           f"cross_attention_dim {u.cross_attention_dim}, add-embedding "
                           f"{u.projection_class_embeddings_input_dim}; this model's UNet has {base.block_out_channels}, "
                           f"{base.cross_attention_dim}, {base.projection_class_embeddings_input_dim}")


def adapter_points(base: UNetConfig, vae_scale: int) -> list[tuple[int, int]]:
    """(width, pixels per feature) where the UNet adds each T2I-Adapter feature: per down block, after its
    last transformer (a level with attention) or after its downsampler (one without); then the mid block."""
    n, out = len(base.block_out_channels), []
    for level, c in enumerate(base.block_out_channels):
        halved = not base.down_attention[level] and level < n - 1
        out.append((c, vae_scale * 2 ** (level + halved)))
    return out + ([(base.block_out_channels[-1], vae_scale * 2 ** (n - 1))] if base.mid_block else [])


def check_adapter(cfg: AdapterConfig, base: UNetConfig, vae_scale: int, name: str) -> None:
    """One line when a T2I-Adapter's features do not fit the UNet's down path (another base model)."""
    factor, feats = cfg.downscale_factor, []
    for _, cout, down in cfg.blocks:
        factor *= 2 if down else 1
        feats.append((cout, factor))
    points = adapter_points(base, vae_scale)
    n = len(base.block_out_channels)
    if feats[:n] != points[:min(len(feats), n)] or len(feats) > len(points):
        raise FewstepError(f"T2I-Adapter {name} is for another base model: its features (width, pixels per "
                           f"feature) are {feats}, this model's UNet takes {points}")


def read_single_file(path: Path, base: UNetConfig, allow_pickle: bool) -> tuple[ControlNetConfig, dict]:
    """An original ControlNet file -> its config (the base UNet's, with the file's own shapes) and its
    weights in diffusers' layout."""
    sd = read_state_dict(path, allow_pickle)
    if any("lora_controlnet" in k for k in sd):
        raise FewstepError(f"{path.name} is a control-LoRA (Stability's ControlNet-LoRA): fewstep does not support "
                           "control-LoRAs; use a full ControlNet")
    prefix = next((p for p in LDM_PREFIXES if f"{p}zero_convs.0.0.weight" in sd), None)
    if prefix is None:
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            raise FewstepError(f"{path.name} is a diffusers ControlNet without its config.json: pass the folder "
                               "holding both")
        if any(k.startswith(("adapter.body.", "body.0.")) for k in sd):
            raise FewstepError(f"{path.name} looks like a T2I-Adapter file: fewstep loads T2I-Adapters from diffusers "
                               "T2IAdapter folders (config.json + diffusion_pytorch_model.safetensors)")
        raise FewstepError(f"{path.name} is not a ControlNet: no zero_convs / input_hint_block keys")
    shapes = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
    cfg = ldm_config(shapes, base, path.name)
    mapped = materialize(plan(shapes, [("", "controlnet", ldm_modules(cfg, shapes))]), lambda k: sd[prefix + k])
    return cfg, mapped["controlnet"]


def _need(shapes: dict, key: str, name: str) -> tuple:
    if key not in shapes:
        raise FewstepError(f"{name} is missing {key}: the file is truncated or not a whole ControlNet")
    return shapes[key]


def _hint_convs(shapes: dict) -> list[int]:
    """The indices of input_hint_block's convs (the odd ones are SiLUs, which hold no weights)."""
    return sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight")})


def ldm_config(shapes: dict, base: UNetConfig, name: str) -> ControlNetConfig:
    """The ControlNetConfig of original keys: the base UNet's structure, checked against the zero convs'
    widths, the text width and the add-embedding, with per-level attention depth read from the keys."""
    widths = tuple(shapes[f"zero_convs.{i}.0.weight"][0] for i in range(_count(shapes, "zero_convs.{}.0.weight")))
    ctx = next((s[1] for k, s in shapes.items() if k.endswith(".attn2.to_k.weight")), None)
    add = shapes.get("label_emb.0.0.weight", (None, None))[1]
    expected = ControlNetConfig(unet=base).skip_channels()
    if widths != expected or ctx != base.cross_attention_dim or add != base.projection_class_embeddings_input_dim:
        raise FewstepError(f"ControlNet {name} is for another base model: skip widths {widths}, cross-attention "
                           f"width {ctx}, add-embedding {add}; this model's UNet has {expected}, "
                           f"{base.cross_attention_dim}, {base.projection_class_embeddings_input_dim}")
    hint = _hint_convs(shapes)
    if len(hint) < 2 or len(hint) % 2:
        raise FewstepError(f"{name}: input_hint_block has {len(hint)} convs; expected a conv in, pairs, a conv out")
    first = _need(shapes, f"input_hint_block.{hint[0]}.weight", name)
    channels = (first[0],) + tuple(shapes[f"input_hint_block.{i}.weight"][0] for i in hint[2:-1:2])
    attention, depth = _attention(shapes, base)
    unet = replace(base, in_channels=_need(shapes, "input_blocks.0.0.weight", name)[1], down_attention=attention,
                   transformer_depth=depth)
    return ControlNetConfig(unet=unet, conditioning_channels=first[1], conditioning_embedding_out_channels=channels)


def _count(shapes: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def _attention(shapes: dict, base: UNetConfig) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """Which levels have attention and how deep, as the file has them (SDXL's small / mid ControlNets have
    less than their base); the mid block's depth stands for the deepest level's, as in UNetConfig."""
    depth, block = [], 1
    for layers in base.layers_per_block:
        depth.append(_count(shapes, f"input_blocks.{block}.1.transformer_blocks.{{}}.norm1.weight"))
        block += layers + 1
    mid = _count(shapes, "middle_block.1.transformer_blocks.{}.norm1.weight")
    if depth[-1] and mid != depth[-1]:
        raise FewstepError(f"unsupported ControlNet: mid-block depth {mid} differs from the deepest level's "
                           f"{depth[-1]}")
    return tuple(d > 0 for d in depth), tuple(d or 1 for d in depth[:-1]) + (mid or depth[-1] or 1,)


def ldm_modules(cfg: ControlNetConfig, shapes: dict) -> Modules:
    """Original module prefixes -> diffusers': the UNet's down and mid path, then the ControlNet's own parts."""
    m: Modules = {k: v for k, v in unet_modules(cfg.unet).items() if not k.startswith(("output_blocks.", "out."))}
    hint = _hint_convs(shapes)
    m[f"input_hint_block.{hint[0]}"] = ("controlnet_cond_embedding.conv_in", PARAM)
    for j, i in enumerate(hint[1:-1]):
        m[f"input_hint_block.{i}"] = (f"controlnet_cond_embedding.blocks.{j}", PARAM)
    m[f"input_hint_block.{hint[-1]}"] = ("controlnet_cond_embedding.conv_out", PARAM)
    for i in range(len(cfg.skip_channels())):
        m[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", PARAM)
    m["middle_block_out.0"] = ("controlnet_mid_block", PARAM)
    return m
