"""Key tables from original single-file Stable Diffusion checkpoints (CompVis LDM / Stability SGM
layout) to the diffusers / transformers layout that fewstep's modules use.

Follows diffusers' `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`) and stable-diffusion.cpp's `model.cpp`,
but as explicit tables instead of chained `str.replace`. The original modules are CompVis
`openaimodel.UNetModel` (input_blocks / middle_block / output_blocks), `diffusionmodules/model.py`
(the autoencoder) and OpenAI CLIP / OpenCLIP text towers.

A table maps an original *module* prefix to (diffusers prefix, parameter table). The UNet and VAE
prefix tables are generated from the model config (levels, layers per level, which levels have
attention, transformer depth), so one generator covers SD 1.x, SD 2.x and SDXL. Every key of a
checkpoint is either found in a table, or listed in `DROPPED_*` below with the reason; anything else
raises a FewstepError that names it. Nothing is skipped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

import torch

from ..configs import UNetConfig, VAEConfig
from ..errors import FewstepError

# A parameter table maps an original parameter name (relative to its module) to one or more
# (diffusers name, op) pairs. Ops: "copy"; "linear" squeezes a 1x1 conv weight [O, I, 1, 1] to a
# Linear weight [O, I]; "transpose" turns OpenCLIP's `x @ P` matrix into a Linear weight; "q"/"k"/"v"
# take one third of OpenCLIP's fused attention in-projection.
Table = dict[str, tuple[tuple[str, str], ...]]
# A module table maps an original module prefix to (diffusers prefix, parameter table), or to None:
# a whole module that is dropped on purpose (see `openclip_modules`).
Modules = dict[str, "tuple[str, Table] | None"]

# ---- keys dropped on purpose (after stable-diffusion.cpp's `unused_tensors` list) ----
DROPPED_PREFIXES = (
    "model_ema.",  # the trainer's EMA shadow; `model.diffusion_model.*` is what runs (EMA-only files keep it there)
    "embedding_manager.",  # textual-inversion training state
)
DROPPED_NAMES = (
    # DDPM schedule buffers of ldm.models.diffusion.ddpm; the schedule is rebuilt from SchedulerConfig.
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "denoiser.sigmas",  # SGM's copy of the same schedule
    "v_pred",  # an empty marker tensor (ComfyUI convention) read by `detect.py` as prediction_type="v_prediction"
    # SD 2.x conditions on the penultimate hidden states, never on the pooled projection.
    "cond_stage_model.model.text_projection", "conditioner.embedders.0.model.text_projection",
)
DROPPED_SUFFIXES = (
    ".position_ids",  # transformers buffer, always arange(77)
    ".attn_mask",  # OpenCLIP's causal mask buffer, rebuilt by the text model
    ".logit_scale",  # CLIP's contrastive-loss temperature, unused for generation
)


def is_dropped(key: str) -> bool:
    return key in DROPPED_NAMES or key.startswith(DROPPED_PREFIXES) or key.endswith(DROPPED_SUFFIXES)


# ---- parameter tables ----
def _wb(*modules: str) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


def _same(names: Iterable[str]) -> Table:
    return {n: ((n, "copy"),) for n in names}


def _renamed(modules: dict[str, str], weight_op: str = "copy") -> Table:
    table = {f"{a}.weight": ((f"{b}.weight", weight_op),) for a, b in modules.items()}
    table.update({f"{a}.bias": ((f"{b}.bias", "copy"),) for a, b in modules.items()})
    return table


PARAM = _same(["weight", "bias"])  # a plain conv / linear / norm: names unchanged
UNET_RESNET = _renamed({"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"})
_TRANSFORMER_BLOCK = ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight",
                      "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
                      *_wb("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")]


@lru_cache
def spatial_transformer(depth: int) -> Table:
    """LDM `SpatialTransformer` = diffusers `Transformer2DModel`: identical names, listed so that an
    unexpected key (a deeper block, a stray parameter) is reported."""
    names = _wb("norm", "proj_in", "proj_out")
    names += [f"transformer_blocks.{k}.{n}" for k in range(depth) for n in _TRANSFORMER_BLOCK]
    return _same(names)


VAE_RESNET = _renamed({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                       "nin_shortcut": "conv_shortcut"})
# LDM `AttnBlock` holds 1x1 convs; diffusers stores them as Linear layers.
VAE_ATTENTION = {**_renamed({"norm": "group_norm"}),
                 **_renamed({"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}, weight_op="linear")}
CLIP_LAYER = _same(_wb("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"))
OPENCLIP_LAYER = {
    "attn.in_proj_weight": (("self_attn.q_proj.weight", "q"), ("self_attn.k_proj.weight", "k"),
                            ("self_attn.v_proj.weight", "v")),
    "attn.in_proj_bias": (("self_attn.q_proj.bias", "q"), ("self_attn.k_proj.bias", "k"),
                          ("self_attn.v_proj.bias", "v")),
    **_renamed({"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2", "ln_2": "layer_norm2"}),
}
OPENCLIP_TOP = {
    "token_embedding.weight": (("text_model.embeddings.token_embedding.weight", "copy"),),
    "positional_embedding": (("text_model.embeddings.position_embedding.weight", "copy"),),
    "ln_final.weight": (("text_model.final_layer_norm.weight", "copy"),),
    "ln_final.bias": (("text_model.final_layer_norm.bias", "copy"),),
}


# ---- module tables ----
def unet_modules(cfg: UNetConfig) -> Modules:
    """`model.diffusion_model.*` modules: fixed stems plus the block tables the config implies."""
    m: Modules = {"time_embed.0": ("time_embedding.linear_1", PARAM), "time_embed.2": ("time_embedding.linear_2", PARAM),
                  "input_blocks.0.0": ("conv_in", PARAM), "out.0": ("conv_norm_out", PARAM), "out.2": ("conv_out", PARAM)}
    if cfg.addition_time_embed_dim is not None:  # SDXL: pooled text + size/crop ids -> time embedding
        m["label_emb.0.0"] = ("add_embedding.linear_1", PARAM)
        m["label_emb.0.2"] = ("add_embedding.linear_2", PARAM)
    m.update(_input_blocks(cfg))
    if cfg.mid_block:
        m["middle_block.0"] = ("mid_block.resnets.0", UNET_RESNET)
        m["middle_block.1"] = ("mid_block.attentions.0", spatial_transformer(cfg.transformer_depth[-1]))
        m["middle_block.2"] = ("mid_block.resnets.1", UNET_RESNET)
    m.update(_output_blocks(cfg))
    return m


def _input_blocks(cfg: UNetConfig) -> Modules:
    """input_blocks.0 is conv_in; then per level one block per layer ([resnet, attention?]) and,
    except at the deepest level, one downsampler block ([op])."""
    m: Modules = {}
    n, i = len(cfg.block_out_channels), 1
    for level in range(n):
        for j in range(cfg.layers_per_block[level]):
            m[f"input_blocks.{i}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET)
            if cfg.down_attention[level]:
                m[f"input_blocks.{i}.1"] = (f"down_blocks.{level}.attentions.{j}",
                                            spatial_transformer(cfg.transformer_depth[level]))
            i += 1
        if level < n - 1:
            m[f"input_blocks.{i}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", PARAM)
            i += 1
    return m


def _output_blocks(cfg: UNetConfig) -> Modules:
    """Deepest level first (diffusers `up_blocks.0`), one more layer per level than on the way down;
    a level's last block ends with the upsampler: [resnet, attention?, upsample]."""
    m: Modules = {}
    n, i = len(cfg.block_out_channels), 0
    for u in range(n):
        level, attn = n - 1 - u, cfg.up_attention[u]
        layers = cfg.layers_per_block[level] + 1
        for j in range(layers):
            m[f"output_blocks.{i}.0"] = (f"up_blocks.{u}.resnets.{j}", UNET_RESNET)
            if attn:
                m[f"output_blocks.{i}.1"] = (f"up_blocks.{u}.attentions.{j}",
                                             spatial_transformer(cfg.transformer_depth[level]))
            if j == layers - 1 and u < n - 1:
                m[f"output_blocks.{i}.{2 if attn else 1}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", PARAM)
            i += 1
    return m


def vae_modules(cfg: VAEConfig) -> Modules:
    """`first_stage_model.*` modules. The LDM decoder numbers its levels from the full-size one
    (`up.0`), diffusers from the deepest (`up_blocks.0`): the up index is reversed."""
    n = len(cfg.block_out_channels)
    m: Modules = {"quant_conv": ("quant_conv", PARAM), "post_quant_conv": ("post_quant_conv", PARAM)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", PARAM)
        m[f"{part}.norm_out"] = (f"{part}.conv_norm_out", PARAM)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", PARAM)
        m[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET)
        m[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION)
        m[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET)
    for i in range(n):
        for j in range(cfg.layers_per_block):
            m[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", PARAM)
        ldm = n - 1 - i
        for j in range(cfg.layers_per_block + 1):
            m[f"decoder.up.{ldm}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < n - 1:
            m[f"decoder.up.{ldm}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", PARAM)
    return m


def clip_modules(num_layers: int) -> Modules:
    """OpenAI CLIP text model as saved by transformers (`...transformer.text_model.*`): same names."""
    m: Modules = {"embeddings": ("text_model.embeddings", _same(["token_embedding.weight", "position_embedding.weight"])),
                  "final_layer_norm": ("text_model.final_layer_norm", PARAM)}
    for i in range(num_layers):
        m[f"encoder.layers.{i}"] = (f"text_model.encoder.layers.{i}", CLIP_LAYER)
    return m


def openclip_modules(num_layers: int, resblocks: int, projection: bool) -> Modules:
    """OpenCLIP text tower (`...model.*`). Keeps the first `num_layers` of the file's `resblocks`:
    SD 2.x conditions on the penultimate layer, so the last resblock is never run and is dropped
    (diffusers' SD 2 text_encoder has 23 of OpenCLIP-H's 24 layers). SDXL's bigG keeps all of them and
    its pooled projection, stored as a [width, proj] matrix for `x @ P`."""
    top = dict(OPENCLIP_TOP)
    if projection:
        top["text_projection"] = (("text_projection.weight", "transpose"),)
    m: Modules = {"": ("", top)}
    for i in range(resblocks):
        m[f"transformer.resblocks.{i}"] = (f"text_model.encoder.layers.{i}", OPENCLIP_LAYER) if i < num_layers else None
    return m


# ---- applying the tables ----
def _lookup(modules: Modules, rest: str):
    """Find the module owning `rest` (longest prefix first); returns (entry, parameter name) or None."""
    cut = len(rest)
    while cut > 0:
        cut = rest.rfind(".", 0, cut)
        if cut < 0:
            break
        if rest[:cut] in modules:
            return modules[rest[:cut]], rest[cut + 1:]
    return (modules[""], rest) if "" in modules else None


def _resolve(key: str, components: list[tuple[str, str, Modules]]):
    """(component, diffusers module prefix, targets) for a key, or None when no table knows it.
    A key of a module dropped on purpose resolves to no targets."""
    for prefix, name, modules in components:
        if key.startswith(prefix):
            found = _lookup(modules, key[len(prefix):])
            if found is None:
                return None
            entry, param = found
            if entry is None:
                return name, "", ()
            targets = entry[1].get(param)
            return (name, entry[0], targets) if targets is not None else None
    return None


def plan(keys: Iterable[str], components: list[tuple[str, str, Modules]]) -> dict[str, dict[str, tuple[str, str]]]:
    """Map every checkpoint key: returns {component: {diffusers key: (original key, op)}}.
    `components` lists (checkpoint prefix, component name, module table)."""
    out: dict[str, dict[str, tuple[str, str]]] = {name: {} for _, name, _ in components}
    unknown = []
    for key in keys:
        if is_dropped(key):
            continue
        resolved = _resolve(key, components)
        if resolved is None:
            unknown.append(key)
            continue
        name, module, targets = resolved
        for suffix, op in targets:
            out[name][f"{module}.{suffix}" if module else suffix] = (key, op)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise FewstepError(f"unknown keys in checkpoint: {', '.join(unknown[:5])}{more}; "
                           "it is not a Stable Diffusion 1.x / 2.x / SDXL checkpoint fewstep understands")
    return out


def apply_op(t: torch.Tensor, op: str) -> torch.Tensor:
    """Views where possible, so converted weights share the loaded storage."""
    if op == "copy":
        return t
    if op == "linear":
        return t.reshape(t.shape[0], -1) if t.ndim > 2 else t
    if op == "transpose":
        return t.t().contiguous()  # small ([1280, 1280]); contiguous so it loads like any Linear weight
    return t.chunk(3, dim=0)["qkv".index(op)]


def materialize(mapping: dict[str, dict[str, tuple[str, str]]],
                get: Callable[[str], torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Fetch each original tensor once (a fused in_proj feeds three keys) and apply the ops."""
    cache: dict[str, torch.Tensor] = {}
    out = {}
    for name, entries in mapping.items():
        sd = {}
        for new, (old, op) in entries.items():
            t = cache.pop(old, None)
            if t is None:
                t = get(old)
            if op in ("q", "k"):  # v comes last: keep the fused tensor until then
                cache[old] = t
            sd[new] = apply_op(t, op)
        out[name] = sd
    return out
