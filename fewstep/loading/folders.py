"""Diffusers folders -> modules and Pipelines: a pipeline folder, or one component folder (UNet, text
encoder, AutoencoderKL / AutoencoderTiny), or original TAESD files.

A folder is read as diffusers writes it (model_index.json, one folder per component, fp16/fp32
`variant` files). Every module is built on the meta device and filled by assignment (see `weights`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..configs import CLIPTextConfig, SchedulerConfig, TAEConfig, TextConditioning, UNetConfig, VAEConfig, read_json
from ..errors import FewstepError
from ..models.clip import CLIPTextModel
from ..models.tae import TinyAutoencoder, latent_channels, taesd_to_diffusers
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..request import Defaults
from ..tokenizer import CLIPTokenizer
from .components import Components
from .dtypes import check_device, vae_dtype
from .hub import resolve
from .weights import build, find_weights, read_state_dict


def _component(folder: Path, stem: str, variant, allow_pickle, make, what, device, dtype):
    sd = read_state_dict(find_weights(folder, stem, variant), allow_pickle)
    return build(make, sd, what, device, dtype)


def load_unet(folder: Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False):
    cfg = UNetConfig.from_diffusers(read_json(Path(folder) / "config.json"))
    return _component(Path(folder), "diffusion_pytorch_model", variant, allow_pickle,
                      lambda: UNet(cfg), f"UNet in {folder}", device, dtype)


def load_text_encoder(folder: Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False):
    cfg = CLIPTextConfig.from_transformers(read_json(Path(folder) / "config.json"))
    return _component(Path(folder), "model", variant, allow_pickle,
                      lambda: CLIPTextModel(cfg), f"text encoder in {folder}", device, dtype)


def load_autoencoder(path: str | Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False,
                     sdxl: bool | None = None):
    """A diffusers AutoencoderKL / AutoencoderTiny folder, a pipeline folder (its vae/), or a folder of
    original TAESD files (*_encoder / *_decoder .safetensors or .pth; `sdxl` says which latent space to
    take where it holds several). Returns a module with `encode(x) -> latents` and `decode(z) -> x`, x in
    [-1, 1], latents in the diffusion model's space."""
    check_device(device, dtype)
    folder = resolve(path, variant)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if (folder / "config.json").is_file():
        d = read_json(folder / "config.json")
        if d.get("_class_name") == "AutoencoderTiny":
            cfg = TAEConfig.from_diffusers(d)
            return _component(folder, "diffusion_pytorch_model", variant, allow_pickle,
                              lambda: TinyAutoencoder(cfg), f"AutoencoderTiny in {folder}", device, dtype)
        cfg = VAEConfig.from_diffusers(d)
        return _component(folder, "diffusion_pytorch_model", variant, allow_pickle,
                          lambda: AutoencoderKL(cfg), f"AutoencoderKL in {folder}", device, dtype)
    return _load_taesd_folder(folder, device, dtype, allow_pickle, sdxl)


def _load_taesd_folder(folder: Path, device, dtype, allow_pickle, sdxl: bool | None):
    if not folder.is_dir():
        raise FewstepError(f"not an autoencoder folder: {folder}")
    suffixes = (".safetensors",) + ((".pth", ".pt") if allow_pickle else ())
    files = [p for p in folder.iterdir() if p.suffix in suffixes and p.stem.endswith(("_encoder", "_decoder"))]
    if not files:
        raise FewstepError(f"{folder} has no config.json and no TAESD *_encoder/*_decoder weight files")
    stem = _taesd_stem(folder, sorted({p.stem.rsplit("_", 1)[0] for p in files}), sdxl)

    def pick(part: str):
        return next((p for p in sorted(files) if p.stem == f"{stem}_{part}"), None)
    return load_taesd(pick("encoder"), pick("decoder"), device=device, dtype=dtype)


def _taesd_stem(folder: Path, stems: list[str], sdxl: bool | None) -> str:
    """Which of a folder's TAESD models to load: the only one, or the one of the pipeline's latent space by
    the file names' convention (taesdxl_* for SDXL, taesd_* for SD 1.x / 2.x), said in a notice."""
    if len(stems) == 1:
        return stems[0]
    wanted = [s for s in stems if sdxl is not None and s.endswith("xl") == sdxl]
    if len(wanted) != 1:
        raise FewstepError(f"{folder} holds several tiny autoencoders ({', '.join(stems)}): pass a folder with one")
    warnings.warn(f"{folder} holds several tiny autoencoders ({', '.join(stems)}): using {wanted[0]}, the "
                  f"{'SDXL' if sdxl else 'SD 1.x / 2.x'} one", stacklevel=3)
    return wanted[0]


def defaults_for(folder: Path, sched: SchedulerConfig) -> Defaults:
    """fewstep.json if the model ships one; else what the scheduler says about the model's intent:
    trailing spacing marks an adversarially distilled (Turbo) model, LCM a consistency model."""
    if (folder / "fewstep.json").is_file():
        d = read_json(folder / "fewstep.json")
        unknown = d.keys() - Defaults.__dataclass_fields__.keys()
        if unknown:
            raise FewstepError(f"{folder / 'fewstep.json'}: unknown keys {sorted(unknown)} "
                               f"(known: {sorted(Defaults.__dataclass_fields__)})")
        return Defaults(**d)
    if sched.class_name == "LCMScheduler":
        return Defaults(steps=4, guidance=1.0)
    if sched.timestep_spacing == "trailing":
        return Defaults(steps=1, guidance=0.0)
    return Defaults()


def load_folder(root: Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False,
                prediction_type=None) -> Components:
    """A diffusers pipeline folder (model_index.json) -> its Components."""
    index = read_json(root / "model_index.json")
    sched = SchedulerConfig.from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"))
    if prediction_type:
        sched = replace(sched, prediction_type=prediction_type)
    # SDXL has two text encoders; its refiner only the second ("text_encoder": [null, null] in its index)
    names = [n for n in ("text_encoder", "text_encoder_2") if (index.get(n) or [None])[0] is not None]
    kw = dict(device=device, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
    # fp32 first, so a half-precision pipeline's fp32 VAE keeps its fp32 weights; then the dtype it should have
    vae = load_autoencoder(root / "vae", **{**kw, "dtype": torch.float32})
    unet = load_unet(root / "unet", **kw)
    text = TextConditioning.for_unet(unet.cfg, bool(index.get("force_zeros_for_empty_prompt", False)),
                                     bool(index.get("requires_aesthetics_score", False)))
    return Components(
        unet=unet,
        vae=vae.to(vae_dtype(vae.cfg, dtype, device, sdxl=text.time_ids)),
        text_encoders=[load_text_encoder(root / n, **kw) for n in names],
        tokenizers=[CLIPTokenizer.from_folder(root / n.replace("text_encoder", "tokenizer")) for n in names],
        scheduler=sched,
        conditioning=text,
        defaults=defaults_for(root, sched),
        name=root.name,
    )


def load_taesd(encoder_path=None, decoder_path=None, device="cpu",
               dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """Load original TAESD files (taesd_encoder / taesd_decoder, .safetensors or .pth); either may be None.

    A `.pth` named here is read with `torch.load(weights_only=True)`: passing its path is the consent
    that `allow_pickle` asks for elsewhere. Latent channels come from the tensors' shapes."""
    if encoder_path is None and decoder_path is None:
        raise FewstepError("load_taesd needs an encoder file, a decoder file, or both")
    sd, names = {}, []
    for side, path in (("encoder", encoder_path), ("decoder", decoder_path)):
        if path is not None:
            sd.update(taesd_to_diffusers(read_state_dict(path, allow_pickle=True), side))
            names.append(str(path))
    cfg = TAEConfig(latent_channels=latent_channels(sd))
    return build(lambda: TinyAutoencoder(cfg, with_encoder=encoder_path is not None,
                                         with_decoder=decoder_path is not None),
                 sd, "TAESD weights " + " + ".join(names), device, dtype)
