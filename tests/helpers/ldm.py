"""Write a diffusers folder back as an original single-file checkpoint (LDM / SGM key layout).

Test helper only. It inverts fewstep's own key tables (`fewstep.loading.convert`), so on its own it would
prove nothing; the tests make it honest by loading the files it writes with diffusers' independent
`from_single_file` and checking the weights come back equal to the folder's.
"""

from pathlib import Path

import torch

from fewstep.configs import CLIPTextConfig, UNetConfig, VAEConfig, read_json
from fewstep.loading.convert import clip_modules, openclip_modules, unet_modules, vae_modules
from fewstep.loading.detect import TEXT_LAYOUTS, UNET, VAE


def extras(layout: str, width: int) -> dict[str, tuple[int, ...]]:
    """Keys real checkpoints carry that fewstep drops on purpose (see convert.DROPPED_*), with their
    real shapes (diffusers reads the SD 2 tower width from `text_projection`)."""
    common = {"alphas_cumprod": (1000,), "betas": (1000,), "model_ema.decay": (), "model_ema.num_updates": ()}
    per_layout = {
        "sd1": {"cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
        "sd1-old": {"cond_stage_model.transformer.embeddings.position_ids": (1, 77)},
        "sd2": {"cond_stage_model.model.logit_scale": (), "cond_stage_model.model.text_projection": (width, width),
                "cond_stage_model.model.attn_mask": (77, 77)},
        "sd2-sgm": {"conditioner.embedders.0.model.logit_scale": (), "denoiser.sigmas": (1000,),
                    "conditioner.embedders.0.model.text_projection": (width, width)},
        "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
                 "conditioner.embedders.1.model.logit_scale": (), "denoiser.sigmas": (1000,)},
    }
    return {**common, **per_layout[layout]}


def text_model_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` prefix; SD folders on the
    hub and fewstep use it (`CLIPTextModelWithProjection` still has it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in sd.items()}


def load_folder(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's state dict, text encoders in the `text_model.*` layout."""
    from safetensors.torch import load_file
    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = sorted((Path(folder) / name).glob("*.safetensors"))
        if files:
            sd = load_file(files[0])
            out[name] = text_model_layout(sd) if name.startswith("text_encoder") else sd
    return out


def _invert(op: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if op == "linear":
        return tensors[0][:, :, None, None]  # Linear [O, I] -> 1x1 conv [O, I, 1, 1]
    if op == "transpose":
        return tensors[0].t()
    if op in ("q", "k", "v"):
        return torch.cat(tensors)
    return tensors[0]


def _write_modules(out: dict, prefix: str, modules, sd: dict[str, torch.Tensor]) -> set[str]:
    used = set()
    for old_module, entry in modules.items():
        if entry is None:
            continue
        new_module, table = entry
        for old_param, targets in table.items():
            names = [f"{new_module}.{s}" if new_module else s for s, _ in targets]
            if all(n in sd for n in names):
                key = prefix + (f"{old_module}.{old_param}" if old_module else old_param)
                out[key] = _invert(targets[0][1], [sd[n] for n in names]).contiguous()
                used.update(names)
    return used


def to_original(folder: Path, layout: str, with_extras: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a tiny diffusers folder; `layout` is a key of detect.TEXT_LAYOUTS."""
    folder = Path(folder)
    unet = UNetConfig.from_diffusers(read_json(folder / "unet" / "config.json"))
    vae = VAEConfig.from_diffusers(read_json(folder / "vae" / "config.json"))
    text = [CLIPTextConfig.from_transformers(read_json(folder / name / "config.json"))
            for _, name, _ in TEXT_LAYOUTS[layout]]
    return original_state_dict(load_folder(folder), unet, vae, text, layout, with_extras, seed)


def original_state_dict(sds: dict, unet: UNetConfig, vae: VAEConfig, text: list[CLIPTextConfig], layout: str,
                        with_extras: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diffusers-layout state dicts -> one original-layout state dict (meta tensors work). SD 2.x
    files get an extra last OpenCLIP resblock, random (never run), as real SD 2 files carry."""
    sds = dict(sds)
    parts = [(UNET, "unet", unet_modules(unet)), (VAE, "vae", vae_modules(vae))]
    for (prefix, name, kind), cfg in zip(TEXT_LAYOUTS[layout], text):
        n = cfg.num_hidden_layers
        if kind == "clip":
            parts.append((prefix, name, clip_modules(n)))
        elif name == "text_encoder":  # SD 2.x: the file has one more resblock than the model runs
            parts.append((prefix, name, openclip_modules(n + 1, n + 1, False)))
            sds[name] = _with_extra_layer(sds[name], n, seed)
        else:
            parts.append((prefix, name, openclip_modules(n, n, True)))
    out: dict[str, torch.Tensor] = {}
    for prefix, name, modules in parts:
        left = set(sds[name]) - _write_modules(out, prefix, modules, sds[name])
        assert not left, f"{name}: keys the inverse tables did not cover: {sorted(left)[:5]}"
    if with_extras:
        g = torch.Generator().manual_seed(seed)
        width = text[0].hidden_size
        for key, shape in extras(layout, width).items():
            out[key] = torch.randn(shape, generator=g)
    return out


def _with_extra_layer(sd: dict, n: int, seed: int) -> dict:
    """Add a random layer n: the 24th OpenCLIP-H layer that SD 2.x files carry but never run."""
    g = torch.Generator().manual_seed(seed + 100)
    extra = {k.replace(".layers.0.", f".layers.{n}."):
             torch.empty(v.shape, device="meta") if v.is_meta else torch.randn(v.shape, generator=g)
             for k, v in sd.items() if ".layers.0." in k}
    return {**sd, **extra}


def save_original(folder: Path, path: Path, layout: str, **kw) -> Path:
    from safetensors.torch import save_file
    save_file(to_original(folder, layout, **kw), str(path))
    return path
