"""Loading an original single-file checkpoint (LDM / SGM layout, e.g. v1-5-pruned-emaonly.safetensors).

The weights are converted by `detect`; what a single file does not carry (tokenizers, the
scheduler, the exact head counts) comes from a diffusers folder given as `config` — as diffusers'
`from_single_file(config=...)` — or, when online, from the family's reference repository.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..configs import CLIPTextConfig, SchedulerConfig, TextConditioning, UNetConfig, VAEConfig, read_json
from ..errors import FewstepError
from ..models.clip import CLIPTextModel
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..tokenizer import CLIPTokenizer
from .components import Components
from .detect import read_checkpoint
from .dtypes import vae_dtype
from .folders import defaults_for
from .hub import REFERENCE_REPOS, download, resolve
from .weights import build


def _config_root(config, family: str) -> Path:
    if config is not None:
        return resolve(config)
    try:
        return download(REFERENCE_REPOS[family], None,
                         ["model_index.json", "*/*config.json", "tokenizer*/*", "scheduler/*"])
    except FewstepError:
        raise FewstepError(f"a single-file checkpoint carries no tokenizer or scheduler: pass config=<a {family} "
                           "diffusers folder> (--config), or go online to fetch them") from None


def _cfg(root: Path, name: str, reader, inferred):
    """The config folder's own config when it has one (it knows the head counts), else the inferred one."""
    path = root / name / "config.json"
    return reader(read_json(path)) if path.is_file() else inferred


def load_single_file(path: Path, *, device="cpu", dtype=torch.float32, allow_pickle=False, config=None,
                     prediction_type=None) -> Components:
    """An original single-file checkpoint -> its Components, its configs from `config` (a diffusers folder) or the
    family's reference repository (online), else inferred from the weights."""
    ck = read_checkpoint(path, allow_pickle=allow_pickle)
    root = _config_root(config, ck.family)
    unet_cfg = _cfg(root, "unet", UNetConfig.from_diffusers, ck.unet)
    vae_cfg = _cfg(root, "vae", VAEConfig.from_diffusers, ck.vae)
    names = ["text_encoder", "text_encoder_2"][:len(ck.text)]
    text_cfgs = [_cfg(root, n, CLIPTextConfig.from_transformers, c) for n, c in zip(names, ck.text)]
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = SchedulerConfig.from_diffusers(read_json(sched_path)) if sched_path.is_file() else SchedulerConfig()
    if prediction_type or ck.prediction_type:
        sched = replace(sched, prediction_type=prediction_type or ck.prediction_type)
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    text = TextConditioning.for_unet(unet_cfg, bool(index.get("force_zeros_for_empty_prompt", ck.family == "sdxl")))
    sds = ck.state_dicts
    return Components(
        unet=build(lambda: UNet(unet_cfg), sds["unet"], f"UNet of {path.name}", device, dtype),
        vae=build(lambda: AutoencoderKL(vae_cfg), sds["vae"], f"VAE of {path.name}", device,
                  vae_dtype(vae_cfg, dtype, device, sdxl=text.time_ids)),
        text_encoders=[build(lambda c=c: CLIPTextModel(c), sds[n], f"{n} of {path.name}", device, dtype)
                       for n, c in zip(names, text_cfgs)],
        tokenizers=[CLIPTokenizer.from_folder(root / n.replace("text_encoder", "tokenizer")) for n in names],
        scheduler=sched,
        conditioning=text,
        defaults=defaults_for(root, sched),
        name=path.stem,
    )
