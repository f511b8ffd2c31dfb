"""Read an original single-file Stable Diffusion checkpoint: detect the family and infer every model
config from tensor names and shapes alone (never from the file name), as stable-diffusion.cpp does,
then convert the weights with the key tables of `convert.py`.

Follows diffusers' `loaders/single_file_utils.py` (`infer_diffusers_model_type`,
`create_unet_diffusers_config_from_ldm`), which reads the same facts from a YAML `original_config`;
here they come from the weights. What weights cannot tell is fixed by the established conventions,
each documented where it is set:
  * attention heads: 8 per level in SD 1.x; 64-wide heads in SD 2.x / SDXL and in every CLIP tower;
  * GroupNorm groups: 32 (the LDM value; groups leave no trace in the weights);
  * prediction type: unknown (`SingleFile.prediction_type` None, its scheduler epsilon). SD 2.x
    768-v and SD 2.x base share every shape, so a v-model needs `prediction_type="v_prediction"`
    (or the ComfyUI `v_pred` marker key in the file);
  * sample size: 64 latents (SD 1.x / 2.x; SD 2.x 768-v is 96), 128 for SDXL;
  * upcast_attention: on for SD 2.x, as diffusers' single-file loader sets it (SD 2.1 config).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..configs import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig
from .convert import clip_modules, materialize, openclip_modules, plan, unet_modules, vae_modules
from ..errors import FewstepError
from .weights import PICKLE_SUFFIXES, read_pickle

UNET, VAE = "model.diffusion_model.", "first_stage_model."
EXPECTED = "(expected SD 1.x, SD 2.x or SDXL keys)"
# Text towers: (checkpoint prefix, component, tower kind), per family and key layout (LDM or SGM).
TEXT_LAYOUTS = {
    "sdxl": [("conditioner.embedders.0.transformer.text_model.", "text_encoder", "clip"),
             ("conditioner.embedders.1.model.", "text_encoder_2", "openclip")],
    "sd2": [("cond_stage_model.model.", "text_encoder", "openclip")],
    "sd2-sgm": [("conditioner.embedders.0.model.", "text_encoder", "openclip")],  # SD-Turbo's file
    "sd1": [("cond_stage_model.transformer.text_model.", "text_encoder", "clip")],
    "sd1-old": [("cond_stage_model.transformer.", "text_encoder", "clip")],  # files without `text_model.`
}


@dataclass
class SingleFile:
    """A converted checkpoint: configs plus diffusers-layout state dicts keyed "unet", "vae",
    "text_encoder" (and "text_encoder_2" for SDXL). Text encoder keys use the transformers
    `text_model.*` layout (plus `text_projection.weight` for SDXL's second encoder)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    unet: UNetConfig
    vae: VAEConfig
    text: list[CLIPTextConfig]
    scheduler: SchedulerConfig  # its prediction_type falls back to epsilon
    prediction_type: str | None  # as given, or stated by the file (`v_pred` key); None: the weights cannot tell
    state_dicts: dict[str, dict[str, torch.Tensor]]


def read_checkpoint(path, allow_pickle: bool = False, prediction_type: str | None = None) -> SingleFile:
    """Load a `.safetensors` file lazily (only the tensors that are kept are read), or a pickle
    (`.ckpt`/`.pt`/`.pth`/`.bin`) with `torch.load(weights_only=True)` when `allow_pickle` is set."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise FewstepError(f"cannot read {path} as safetensors: {e}") from None
        with handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            return _convert(shapes, handle.get_tensor, prediction_type)
    if suffix in PICKLE_SUFFIXES:
        return convert_state_dict(read_pickle(path, allow_pickle), prediction_type)
    raise FewstepError(f"{path}: unsupported checkpoint format {suffix!r} "
                       f"(expected .safetensors, or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True)")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], prediction_type: str | None = None) -> SingleFile:
    """Convert an in-memory original-layout state dict (meta tensors work: detection reads shapes only)."""
    return _convert({k: tuple(v.shape) for k, v in state_dict.items()}, state_dict.__getitem__, prediction_type)


def _convert(shapes: dict[str, tuple], get: Callable[[str], torch.Tensor], prediction_type: str | None) -> SingleFile:
    family, layout = detect_family(shapes)
    text, components = [], []
    for prefix, name, kind in TEXT_LAYOUTS[layout]:
        if kind == "clip":
            cfg = clip_config(shapes, prefix)
            modules = clip_modules(cfg.num_hidden_layers)
        else:
            cfg, resblocks = openclip_config(shapes, prefix, penultimate=family == "sd2")
            modules = openclip_modules(cfg.num_hidden_layers, resblocks, cfg.projection_dim is not None)
        text.append(cfg)
        components.append((prefix, name, modules))
    unet, vae = unet_config(shapes, family, text), vae_config(shapes, family)
    components += [(UNET, "unet", unet_modules(unet)), (VAE, "vae", vae_modules(vae))]
    state_dicts = materialize(plan(shapes, components), get)
    if prediction_type is None and "v_pred" in shapes:
        prediction_type = "v_prediction"
    # The LDM training schedule (scaled_linear 0.00085..0.012, 1000 steps) with the sampling defaults of
    # the shipped SD configs; Turbo-style distilled models want trailing spacing, chosen at generation.
    scheduler = SchedulerConfig(prediction_type=prediction_type or "epsilon", timestep_spacing="leading",
                                steps_offset=1)
    return SingleFile(family, unet, vae, text, scheduler, prediction_type, state_dicts)


def _has(shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def detect_family(shapes: Mapping[str, tuple]) -> tuple[str, str]:
    """(family, text layout) from which text towers are present; the UNet and VAE must be there too."""
    if not _has(shapes, UNET) or not _has(shapes, VAE):
        part = "UNet (model.diffusion_model.*)" if not _has(shapes, UNET) else "VAE (first_stage_model.*)"
        raise FewstepError(f"unrecognised checkpoint layout: no {part} keys {EXPECTED}")
    if _has(shapes, "conditioner.embedders.1.model.") and _has(shapes, "conditioner.embedders.0.transformer."):
        family, layout = "sdxl", "sdxl"
    elif _has(shapes, "conditioner.embedders.0.model.") and not _has(shapes, "conditioner.embedders.1."):
        family, layout = "sd2", "sd2-sgm"
    elif _has(shapes, "cond_stage_model.model."):
        family, layout = "sd2", "sd2"
    elif _has(shapes, "cond_stage_model.transformer."):
        family = "sd1"
        layout = "sd1" if _has(shapes, "cond_stage_model.transformer.text_model.") else "sd1-old"
    else:
        raise FewstepError(f"unrecognised checkpoint layout: no known text encoder keys {EXPECTED}")
    if family != "sdxl" and f"{UNET}label_emb.0.0.weight" in shapes:
        raise FewstepError("unrecognised checkpoint layout: a label_emb add-embedding without SDXL's two text "
                           f"encoders (SDXL refiner or SD 2 unCLIP?) {EXPECTED}")
    return family, layout


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    if key not in shapes:
        raise FewstepError(f"checkpoint is missing {key}: the file is truncated or not a full SD checkpoint")
    return shapes[key]


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    """How many consecutive indices i have `pattern.format(i)` in the checkpoint."""
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def _heads64(width: int) -> int:
    """Heads are not stored in weights; SD 2.x / SDXL UNets and all CLIP towers use 64-wide heads."""
    return max(1, width // 64)


def clip_config(shapes, prefix: str) -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14 text model (SD 1.x, SDXL's first encoder): quick_gelu activations."""
    vocab, hidden = _shape(shapes, prefix + "embeddings.token_embedding.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=_heads64(hidden),
        intermediate_size=_shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(shapes, prefix + "encoder.layers.{}.layer_norm1.weight"),
        max_position_embeddings=_shape(shapes, prefix + "embeddings.position_embedding.weight")[0],
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)  # ids as the shipped configs


def openclip_config(shapes, prefix: str, penultimate: bool) -> tuple[CLIPTextConfig, int]:
    """OpenCLIP text tower (SD 2.x: ViT-H, SDXL: bigG): gelu activations. Returns the config and the
    number of resblocks in the file; `penultimate` drops the last one (SD 2.x never runs it)."""
    vocab, hidden = _shape(shapes, prefix + "token_embedding.weight")
    resblocks = _count(shapes, prefix + "transformer.resblocks.{}.ln_1.weight")
    projection = None if penultimate else _shape(shapes, prefix + "text_projection")[1]  # [width, proj]
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=_heads64(hidden),
        intermediate_size=_shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=resblocks - 1 if penultimate else resblocks,
        max_position_embeddings=_shape(shapes, prefix + "positional_embedding")[0],
        hidden_act="gelu", projection_dim=projection, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return cfg, resblocks


def vae_config(shapes, family: str) -> VAEConfig:
    """AutoencoderKL from `first_stage_model.*` shapes; the latent scale is the family's (SDXL retrained
    its VAE: 0.13025; SD 1.x / 2.x: 0.18215)."""
    enc = VAE + "encoder."
    n = _count(shapes, enc + "down.{}.block.0.conv1.weight")
    return VAEConfig(
        in_channels=_shape(shapes, enc + "conv_in.weight")[1],
        out_channels=_shape(shapes, VAE + "decoder.conv_out.weight")[0],
        latent_channels=_shape(shapes, VAE + "decoder.conv_in.weight")[1],
        block_out_channels=tuple(shapes[f"{enc}down.{i}.block.0.conv1.weight"][0] for i in range(n)),
        layers_per_block=_count(shapes, enc + "down.0.block.{}.conv1.weight"),
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
        use_quant_conv=VAE + "quant_conv.weight" in shapes,
        use_post_quant_conv=VAE + "post_quant_conv.weight" in shapes,
        mid_block_add_attention=enc + "mid.attn_1.q.weight" in shapes)


def _blocks(shapes, stem: str) -> list[int]:
    """Sorted block indices i of keys `stem{i}.*`."""
    return sorted({int(k[len(stem):].split(".", 1)[0]) for k in shapes if k.startswith(stem)})


def _down_levels(shapes) -> list[list[int]]:
    """input_blocks per resolution level; block 0 is conv_in and a downsampler block (`.0.op`) closes a level."""
    levels, current = [], []
    for i in _blocks(shapes, UNET + "input_blocks.")[1:]:
        if f"{UNET}input_blocks.{i}.0.op.weight" in shapes:
            levels.append(current)
            current = []
        else:
            current.append(i)
    return levels + [current]


def _up_levels(shapes) -> list[list[int]]:
    """output_blocks per level (deepest first); the block holding an upsampler (`.1.conv` or, after an
    attention, `.2.conv`) is the last of its level."""
    levels, current = [], []
    for i in _blocks(shapes, UNET + "output_blocks."):
        current.append(i)
        if f"{UNET}output_blocks.{i}.1.conv.weight" in shapes or f"{UNET}output_blocks.{i}.2.conv.weight" in shapes:
            levels.append(current)
            current = []
    return levels + [current]


def _level_attention(shapes, stem: str, blocks: list[int]) -> bool:
    has = {f"{stem}{i}.1.proj_in.weight" in shapes for i in blocks}
    if len(has) != 1:
        raise FewstepError(f"unrecognised checkpoint layout: attention on only some blocks of {stem}{blocks} {EXPECTED}")
    return has.pop()


def _first(shapes, suffix: str) -> tuple:
    key = next((k for k in shapes if k.startswith(UNET) and k.endswith(suffix)), None)
    if key is None:
        raise FewstepError(f"unrecognised checkpoint layout: the UNet has no '{suffix}' (no cross-attention) {EXPECTED}")
    return shapes[key]


def _depths(shapes, down: list[list[int]], down_attention: tuple[bool, ...]) -> tuple[int, ...]:
    """Transformer blocks per level (1 where a level has no attention, as diffusers configs say); the
    mid block has no entry of its own in UNetConfig, it uses the deepest level's."""
    depth = [_count(shapes, f"{UNET}input_blocks.{lv[0]}.1.transformer_blocks.{{}}.norm1.weight") or 1 for lv in down]
    if f"{UNET}middle_block.1.proj_in.weight" in shapes:
        mid = _count(shapes, f"{UNET}middle_block.1.transformer_blocks.{{}}.norm1.weight")
        if down_attention[-1] and mid != depth[-1]:
            raise FewstepError(f"unsupported UNet: mid-block depth {mid} differs from the deepest level's {depth[-1]}")
        depth[-1] = mid
    return tuple(depth)


def _text_time(shapes, text: list[CLIPTextConfig]) -> tuple[int | None, int | None]:
    """SDXL's add-embedding input = pooled text (the last encoder's projection) + 6 Fourier-embedded
    ids (original size, crop, target size): returns (per-id dim, input dim), e.g. (256, 2816)."""
    add = shapes.get(f"{UNET}label_emb.0.0.weight")
    if add is None:
        return None, None
    pooled = text[-1].projection_dim
    if pooled is None or (add[1] - pooled) <= 0 or (add[1] - pooled) % 6:
        raise FewstepError(f"unsupported UNet: label_emb input width {add[1]} is not pooled text + 6 time ids")
    return (add[1] - pooled) // 6, add[1]


def unet_config(shapes, family: str, text: list[CLIPTextConfig]) -> UNetConfig:
    """UNetConfig from the block structure of `model.diffusion_model.*`."""
    down, up = _down_levels(shapes), _up_levels(shapes)
    n = len(down)
    if any(not lv for lv in down) or len(up) != n or any(len(up[n - 1 - i]) != len(down[i]) + 1 for i in range(n)):
        raise FewstepError(f"unrecognised checkpoint layout: UNet output blocks do not mirror its input blocks {EXPECTED}")
    widths = tuple(_shape(shapes, f"{UNET}input_blocks.{lv[0]}.0.out_layers.3.weight")[0] for lv in down)
    down_attention = tuple(_level_attention(shapes, UNET + "input_blocks.", lv) for lv in down)
    time_dim, add_dim = _text_time(shapes, text)
    return UNetConfig(
        in_channels=_shape(shapes, f"{UNET}input_blocks.0.0.weight")[1],  # 9 for inpainting models
        out_channels=_shape(shapes, f"{UNET}out.2.weight")[0],
        block_out_channels=widths,
        down_attention=down_attention,
        up_attention=tuple(_level_attention(shapes, UNET + "output_blocks.", lv) for lv in up),
        layers_per_block=tuple(len(lv) for lv in down),
        transformer_depth=_depths(shapes, down, down_attention),
        # Heads are not in the weights: SD 1.x used 8 per level, SD 2.x / SDXL 64-wide heads.
        num_heads=(8,) * n if family == "sd1" else tuple(_heads64(c) for c in widths),
        only_cross_attention=(False,) * n,  # no SD 1.x / 2.x / SDXL model drops self-attention
        cross_attention_dim=_first(shapes, ".attn2.to_k.weight")[1],
        use_linear_projection=len(_first(shapes, ".proj_in.weight")) == 2,  # Linear [C, C] vs 1x1 conv
        upcast_attention=family == "sd2",
        mid_block=f"{UNET}middle_block.0.in_layers.0.weight" in shapes,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=add_dim,
        sample_size=128 if family == "sdxl" else 64,
    )
