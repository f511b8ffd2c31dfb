"""The model families fewstep knows by name, as config objects, and the same description read from a
path without touching its weights.

A built-in is the architecture only (no weights): the values below are those of the public diffusers /
transformers configs of each model (stable-diffusion-v1-5, stable-diffusion-2-1-base, sd-turbo,
stable-diffusion-xl-base-1.0, sdxl-turbo, IDKiro/sdxs-512-dreamshaper, madebyollin/taesd), so
`fewstep inspect sdxl-turbo` can build the modules on the meta device and count them.

SDXS-512 (Song et al. 2024, "SDXS: Real-Time One-Step Latent Diffusion Models with Image
Conditions") is SD 1.5 with the deepest level and the mid block removed and one resnet per level:
`mid_block_type: null`, `layers_per_block: 1`, (320, 640, 1280) channels, 8 heads, CLIP-L context,
and a TAESD-style tiny decoder. Its transformer blocks keep self-attention (`only_cross_attention`
false): with attn1 attending to the text instead, the UNet would have 312,305,604 parameters,
not the published 315,746,244 (checked in the inspect tests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from ..configs import CLIPTextConfig, TAEConfig, UNetConfig, VAEConfig, read_json
from ..errors import FewstepError
from ..loading import detect
from ..loading.hub import ASSETS, HUB_ID, download
from ..models.tae import latent_channels, taesd_to_diffusers


@dataclass(frozen=True)
class Family:
    """One text-to-image model's architecture: what `inspect` builds. Any part may be absent (a path
    to a single component, or the TAESD autoencoder alone)."""

    name: str
    unet: UNetConfig | None = None
    text: tuple[CLIPTextConfig, ...] = ()  # text_encoder, text_encoder_2
    vae: VAEConfig | None = None
    tae: TAEConfig | None = None
    tae_parts: tuple[str, ...] = ("encoder", "decoder")  # original TAESD files come one side at a time
    latent_scale: int = 8  # image pixels per latent pixel (three 2x resamplings in every SD autoencoder)
    description: str = ""

    @property
    def resolution(self) -> int:
        """The image side the UNet was trained at (512 where there is no UNet)."""
        return self.unet.sample_size * self.latent_scale if self.unet else 512


# Text encoders, as transformers configs them (the token ids matter only for pooling, not for shapes).
_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        hidden_act="quick_gelu", **_IDS)
# SD 2.x runs OpenCLIP ViT-H's text tower without its last layer (the penultimate output): 23 of 24.
OPENCLIP_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                            num_attention_heads=16, hidden_act="gelu", **_IDS)
OPENCLIP_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **_IDS)

SD_VAE = VAEConfig()  # (128, 256, 512, 512), scaling 0.18215
SDXL_VAE = VAEConfig(scaling_factor=0.13025)  # same layout, retrained

SD15_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280, 1280), down_attention=(True, True, True, False),
    up_attention=(False, True, True, True), layers_per_block=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1),
    num_heads=(8, 8, 8, 8), cross_attention_dim=768, use_linear_projection=False, sample_size=64)
SD21_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280, 1280), down_attention=(True, True, True, False),
    up_attention=(False, True, True, True), layers_per_block=(2, 2, 2, 2), transformer_depth=(1, 1, 1, 1),
    num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, sample_size=64)
SDXL_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280), down_attention=(False, True, True), up_attention=(True, True, False),
    layers_per_block=(2, 2, 2), transformer_depth=(1, 2, 10), num_heads=(5, 10, 20),
    only_cross_attention=(False, False, False), cross_attention_dim=2048, use_linear_projection=True,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 ids x 256
    sample_size=128)
SDXS_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280), down_attention=(False, True, True), up_attention=(True, True, False),
    layers_per_block=(1, 1, 1), transformer_depth=(1, 1, 1), num_heads=(8, 8, 8),
    only_cross_attention=(False, False, False), cross_attention_dim=768, use_linear_projection=False,
    mid_block=False, sample_size=64)


BUILTINS: dict[str, Family] = {f.name: f for f in (
    Family("sd15", SD15_UNET, (CLIP_L,), SD_VAE, description="Stable Diffusion 1.5"),
    Family("sd21-base", SD21_UNET, (OPENCLIP_H,), SD_VAE, description="Stable Diffusion 2.1-base"),
    Family("sd-turbo", SD21_UNET, (OPENCLIP_H,), SD_VAE, description="SD-Turbo (SD 2.1-base distilled, ADD)"),
    Family("sdxl-base", SDXL_UNET, (CLIP_L, OPENCLIP_BIGG), SDXL_VAE, description="Stable Diffusion XL base 1.0"),
    Family("sdxl-turbo", replace(SDXL_UNET, sample_size=64), (CLIP_L, OPENCLIP_BIGG), SDXL_VAE,
           description="SDXL-Turbo (SDXL distilled at 512, ADD)"),
    Family("sdxs-512", SDXS_UNET, (CLIP_L,), tae=TAEConfig(),
           description="SDXS-512-DreamShaper (pruned SD 1.5 UNet, tiny decoder)"),
    Family("taesd", tae=TAEConfig(), description="TAESD tiny autoencoder for SD 1.x / 2.x latents"),
)}


def family(name_or_path: str | Path) -> Family:
    """A built-in by name, a shipped model (`fewstep/assets/<name>`), or the configs found at a path
    (a diffusers pipeline or component folder, a single-file checkpoint, TAESD files, or a hub id,
    of which only the configs are downloaded). Weights are never read, only safetensors headers."""
    key = str(name_or_path)
    if key in BUILTINS:
        return BUILTINS[key]
    path = Path(key).expanduser()
    if not path.exists() and (ASSETS / key).is_dir():
        path = ASSETS / key
    if not path.exists():
        if not HUB_ID.match(key):
            shipped = sorted(d.name for d in ASSETS.glob("*") if (d / "model_index.json").is_file())
            raise FewstepError(f"unknown model '{key}': not a built-in ({', '.join(BUILTINS)}), "
                               f"{'a shipped model (' + ', '.join(shipped) + '), ' if shipped else ''}"
                               "or an existing file or folder")
        path = download(key, None, ["model_index.json", "*/config.json", "config.json"])
    if path.is_file():
        return _from_file(path)
    return _from_folder(path)


def _from_folder(path: Path) -> Family:
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        names = [n for n in ("text_encoder", "text_encoder_2") if n in index and (path / n).is_dir()]
        text = tuple(CLIPTextConfig.from_transformers(read_json(path / n / "config.json")) for n in names)
        unet = UNetConfig.from_diffusers(read_json(path / "unet" / "config.json"))
        ae = _from_folder(path / "vae") if (path / "vae").is_dir() else Family(path.name)
        return Family(path.name, unet, text, ae.vae, ae.tae, description="diffusers pipeline")
    if (path / "config.json").is_file():
        d = read_json(path / "config.json")
        kind = d.get("_class_name") or (d.get("architectures") or [""])[0]
        what = f"{kind} folder"
        if kind == "UNet2DConditionModel":
            return Family(path.name, unet=UNetConfig.from_diffusers(d), description=what)
        if kind == "AutoencoderKL":
            return Family(path.name, vae=VAEConfig.from_diffusers(d), description=what)
        if kind == "AutoencoderTiny":
            return Family(path.name, tae=TAEConfig.from_diffusers(d), description=what)
        if kind.startswith("CLIPTextModel"):
            return Family(path.name, text=(CLIPTextConfig.from_transformers(d),), description=what)
        raise FewstepError(f"{path}/config.json describes a {kind or 'unknown model'}, which inspect cannot build")
    files = sorted(path.glob("*_encoder.safetensors")) + sorted(path.glob("*_decoder.safetensors"))
    stems = sorted({f.stem.rsplit("_", 1)[0] for f in files})
    if len(stems) > 1:
        raise FewstepError(f"{path} holds several TAESD models ({', '.join(stems)}): pass one of the files")
    if files:
        return _taesd(files, "TAESD files", stems[0])
    raise FewstepError(f"{path}: no model_index.json, config.json or TAESD *_encoder/*_decoder.safetensors")


def _shapes(path: Path) -> dict[str, tuple]:
    """Tensor shapes from a safetensors header (no tensor data is read)."""
    if path.suffix != ".safetensors":
        raise FewstepError(f"{path}: inspect reads .safetensors files only (it never unpickles a checkpoint)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise FewstepError(f"cannot read {path} as safetensors: {e}") from None


def _from_file(path: Path) -> Family:
    shapes = _shapes(path)
    if not any(k.startswith(detect.UNET) for k in shapes):
        return _taesd([path], "TAESD file", path.stem)
    fam, layout = detect.detect_family(shapes)
    text = []
    for prefix, _, kind in detect.TEXT_LAYOUTS[layout]:
        text.append(detect.clip_config(shapes, prefix) if kind == "clip"
                    else detect.openclip_config(shapes, prefix, penultimate=fam == "sd2")[0])
    return Family(path.stem, detect.unet_config(shapes, fam, text), tuple(text), detect.vae_config(shapes, fam),
                  description=f"{fam} single-file checkpoint")


def _taesd(files: list[Path], what: str, name: str) -> Family:
    """Original TAESD files: the side from the file name's suffix is checked against the keys, the
    latent channels come from the shapes (as `loading.folders.load_taesd` does)."""
    sd, parts = {}, []
    for f in files:
        side = "decoder" if f.stem.endswith("_decoder") else "encoder"
        metas = {k: torch.empty(s, device="meta") for k, s in _shapes(f).items()}
        if not all(k.split(".")[0].isdigit() for k in metas):
            raise FewstepError(f"{f} is neither an SD single-file checkpoint nor an original TAESD file")
        sd.update(taesd_to_diffusers(metas, side))
        parts.append(side)
    return Family(name, tae=TAEConfig(latent_channels=latent_channels(sd)), tae_parts=tuple(parts),
                  description=what)
