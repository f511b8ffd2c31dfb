"""`fewstep.load`: a diffusers folder, an original single-file checkpoint or a hub id -> Pipeline.

A diffusers folder is read as diffusers writes it (model_index.json, one folder per component,
fp16/fp32 `variant` files); a single file is converted by `fewstep.detect` (family from tensor
names and shapes); a hub id goes through huggingface_hub. Every module is built on the meta device
and filled by assignment (see `fewstep.weights`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from .configs import CLIPTextConfig, SchedulerConfig, TAEConfig, UNetConfig, VAEConfig, read_json
from .errors import FewstepError
from .pipeline import Defaults, Pipeline, vae_dtype
from .weights import build, find_weights, read_state_dict

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "shapes-turbo"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Where a single-file checkpoint's tokenizers come from when no `config` folder is given (online only).
REFERENCE_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "sd2": "stabilityai/stable-diffusion-2-1-base",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def resolve(path: str | Path | None, variant: str | None = None) -> Path:
    """A local path as is; a hub id downloaded (configs, tokenizers and one set of weights)."""
    if path is None:
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise FewstepError("no default model is installed; pass a model folder, checkpoint file or hub id")
        return DEFAULT_MODEL
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not HUB_ID.match(str(path)):
        raise FewstepError(f"no such file or folder: {path}")
    return _download(str(path), variant)


def _download(repo: str, variant: str | None, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    weights = f"*.{variant}.safetensors" if variant else "*/*model.safetensors"
    patterns = patterns or ["model_index.json", "fewstep.json", "*/*.json", "*/*.txt", weights,
                            "*/*.safetensors.index.json", "*/*-of-*.safetensors"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all one message for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FewstepError(f"'{repo}' is not a local path, and downloading it from the hub failed "
                           f"(offline or unknown id): {first}") from None


def _component(folder: Path, stem: str, variant, allow_pickle, make, what, device, dtype):
    sd = read_state_dict(find_weights(folder, stem, variant), allow_pickle)
    return build(make, sd, what, device, dtype)


def load_unet(folder: Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False):
    from .models.unet import UNet
    cfg = UNetConfig.from_diffusers(read_json(Path(folder) / "config.json"))
    return _component(Path(folder), "diffusion_pytorch_model", variant, allow_pickle,
                      lambda: UNet(cfg), f"UNet in {folder}", device, dtype)


def load_text_encoder(folder: Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False):
    from .models.clip import CLIPTextModel
    cfg = CLIPTextConfig.from_transformers(read_json(Path(folder) / "config.json"))
    return _component(Path(folder), "model", variant, allow_pickle,
                      lambda: CLIPTextModel(cfg), f"text encoder in {folder}", device, dtype)


def load_autoencoder(path: str | Path, device="cpu", dtype=torch.float32, variant=None, allow_pickle=False):
    """A diffusers AutoencoderKL / AutoencoderTiny folder, a pipeline folder (its vae/), or a folder of
    original TAESD files (*_encoder / *_decoder .safetensors or .pth). Returns a module with
    `encode(x) -> latents` and `decode(z) -> x`, x in [-1, 1], latents in the diffusion model's space."""
    folder = resolve(path, variant)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if (folder / "config.json").is_file():
        d = read_json(folder / "config.json")
        if d.get("_class_name") == "AutoencoderTiny":
            from .models.tae import TinyAutoencoder
            cfg = TAEConfig.from_diffusers(d)
            return _component(folder, "diffusion_pytorch_model", variant, allow_pickle,
                              lambda: TinyAutoencoder(cfg), f"AutoencoderTiny in {folder}", device, dtype)
        from .models.vae import AutoencoderKL
        cfg = VAEConfig.from_diffusers(d)
        return _component(folder, "diffusion_pytorch_model", variant, allow_pickle,
                          lambda: AutoencoderKL(cfg), f"AutoencoderKL in {folder}", device, dtype)
    return _load_taesd_folder(folder, device, dtype, allow_pickle)


def _load_taesd_folder(folder: Path, device, dtype, allow_pickle):
    from .models.tae import load_taesd
    if not folder.is_dir():
        raise FewstepError(f"not an autoencoder folder: {folder}")
    suffixes = (".safetensors",) + ((".pth", ".pt") if allow_pickle else ())

    def pick(part: str):
        found = sorted(p for p in folder.iterdir() if p.stem.endswith(part) and p.suffix in suffixes)
        return found[0] if found else None
    enc, dec = pick("_encoder"), pick("_decoder")
    if enc is None and dec is None:
        raise FewstepError(f"{folder} has no config.json and no TAESD *_encoder/*_decoder weight files")
    return load_taesd(enc, dec, device=device, dtype=dtype)


def _defaults(folder: Path, sched: SchedulerConfig) -> Defaults:
    """fewstep.json if the model ships one; else what the scheduler says about the model's intent:
    trailing spacing marks an adversarially distilled (Turbo) model, LCM a consistency model."""
    if (folder / "fewstep.json").is_file():
        d = read_json(folder / "fewstep.json")
        unknown = d.keys() - Defaults.__dataclass_fields__.keys()
        if unknown:
            raise FewstepError(f"{folder / 'fewstep.json'}: unknown keys {sorted(unknown)} "
                               f"(known: {sorted(Defaults.__dataclass_fields__)})")
        return Defaults(**d)
    if sched.sampler == "lcm":
        return Defaults(steps=4, guidance=1.0)
    if sched.timestep_spacing == "trailing":
        return Defaults(steps=1, guidance=0.0)
    return Defaults()


def load(path: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         variant: str | None = None, allow_pickle: bool = False, config: str | Path | None = None,
         prediction_type: str | None = None, channels_last: bool = False, fuse_qkv: bool = False,
         decoder: str | Path | None = None, token_downsample: int | None = None) -> Pipeline:
    """Load a text-to-image pipeline.

    path: a diffusers folder, a single-file checkpoint (.safetensors; .ckpt only with allow_pickle), a hub
    id, or None for the built-in default model. config: for single files, a diffusers folder whose
    configs and tokenizers to use (as diffusers' `from_single_file(config=...)`); prediction_type
    overrides the scheduler's (e.g. "v_prediction" for SD 2.x 768-v single files).

    dtype applies to the UNet and text encoders; an fp16 pipeline keeps a `force_upcast` VAE in fp32 on
    a CPU, and on a GPU for SDXL only, as diffusers does (`pipeline.vae_dtype`). channels_last,
    fuse_qkv, decoder ("tiny", "full" or a TAESD folder) and token_downsample (ToDo's factor, e.g. 2)
    are the speed options of `fewstep.accel.optimize`."""
    from .accel import optimize
    root = resolve(path, variant)
    if root.is_file():
        from .single_file import load_single_file
        pipe = load_single_file(root, device=device, dtype=dtype, allow_pickle=allow_pickle, config=config,
                                prediction_type=prediction_type)
    else:
        pipe = _load_folder(root, device, dtype, variant, allow_pickle, prediction_type)
    return optimize(pipe, channels_last=channels_last, fuse_qkv=fuse_qkv, decoder=decoder,
                    token_downsample=token_downsample)


def _load_folder(root: Path, device, dtype, variant, allow_pickle, prediction_type) -> Pipeline:
    index = read_json(root / "model_index.json")
    sched = SchedulerConfig.from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"))
    if prediction_type:
        sched = replace(sched, prediction_type=prediction_type)
    names = ["text_encoder", "text_encoder_2"] if "text_encoder_2" in index else ["text_encoder"]
    from .tokenizer import CLIPTokenizer
    kw = dict(device=device, dtype=dtype, variant=variant, allow_pickle=allow_pickle)
    # fp32 first, so a half-precision pipeline's fp32 VAE keeps its fp32 weights; then the dtype it should have
    vae = load_autoencoder(root / "vae", **{**kw, "dtype": torch.float32})
    return Pipeline(
        unet=load_unet(root / "unet", **kw),
        vae=vae.to(vae_dtype(vae.cfg, dtype, device, sdxl=len(names) == 2)),
        text_encoders=[load_text_encoder(root / n, **kw) for n in names],
        tokenizers=[CLIPTokenizer.from_folder(root / n.replace("text_encoder", "tokenizer")) for n in names],
        scheduler=sched,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        defaults=_defaults(root, sched),
        name=root.name,
    )
