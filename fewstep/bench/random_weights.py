"""Real architectures with random weights, as diffusers folders, for speed measurements without checkpoints.

`random_folder("sd-turbo")` writes `~/.cache/fewstep/random/sd-turbo/` once from the public configs in
`../shared/data/configs/<arch>` (model_index.json, unet/vae/text_encoder(_2) configs, scheduler,
tokenizers): every weight file is filled with seeded random values (N(0, 0.02); norms get weight 1,
bias 0, as a fresh model would). Both fewstep and diffusers then load the very same files, so a speed
comparison measures the code and not the checkpoint. The key layout comes from fewstep's own modules,
built on the meta device; their names are the diffusers / transformers state-dict names, so diffusers
is not needed to write the folder (tests/bench/test_bench.py checks that diffusers loads it with no missing key).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configs import CLIPTextConfig, UNetConfig, VAEConfig, read_json
from ..errors import FewstepError
from ..loading.weights import no_init
from ..models.clip import CLIPTextModel
from ..models.unet import UNet
from ..models.vae import AutoencoderKL

CACHE = Path("~/.cache/fewstep/random").expanduser()
# (folder, weights file stem); tokenizers and the scheduler are copied as they are.
COMPONENTS = (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
              ("text_encoder", "model"), ("text_encoder_2", "model"))
COPIED = ("scheduler", "tokenizer", "tokenizer_2")
MARKER = "fewstep-random.json"  # written last: a folder without it is incomplete


def shared_data() -> Path:
    """`$FEWSTEP_SHARED_DATA`, else `../shared/data` beside the fewstep checkout."""
    return Path(os.environ.get("FEWSTEP_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def architectures(configs: Path | None = None) -> list[str]:
    configs = configs or shared_data() / "configs"
    return sorted(d.name for d in configs.iterdir() if (d / "model_index.json").is_file()) if configs.is_dir() else []


def random_folder(arch: str, root: Path | None = None, configs: Path | None = None, seed: int = 0,
                  log=None) -> Path:
    """The random-weight diffusers folder of `arch` under root (default ~/.cache/fewstep/random), made
    on first use from `configs/<arch>` (`log(message)` is told before the minute that may take)."""
    configs = Path(configs) if configs else shared_data() / "configs"
    if not configs.is_dir():
        raise FewstepError(f"--random-weights needs the real model configs in {configs}: set FEWSTEP_SHARED_DATA "
                           "to the folder that holds configs/<arch>/")
    src = configs / arch
    if not (src / "model_index.json").is_file():
        raise FewstepError(f"unknown architecture '{arch}' for --random-weights: no {src}/model_index.json "
                           f"(available: {', '.join(architectures(configs)) or 'none'})")
    dest = Path(root or CACHE).expanduser() / arch
    if (dest / MARKER).is_file():
        return dest
    if log:
        log(f"writing random weights to {dest} (once) ...")
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((src / "model_index.json").read_text())
    names = [n for n, _ in COMPONENTS if n in index] + [n for n in COPIED if n in index]
    for name in COPIED:
        if name in index:
            shutil.copytree(src / name, tmp / name)
        if name in index and name.startswith("tokenizer"):
            _complete_tokenizer(tmp / name)
    for i, (name, stem) in enumerate(COMPONENTS):
        if name in index:
            (tmp / name).mkdir()
            shutil.copy(src / name / "config.json", tmp / name / "config.json")
            _write_random(name, tmp / name, stem, seed + i)
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in names or not isinstance(v, list)}
    if "safety_checker" in index:  # diffusers asks for these keys; None means "not used"
        kept.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (tmp / "model_index.json").write_text(json.dumps(kept, indent=2))
    (tmp / MARKER).write_text(json.dumps({"arch": arch, "configs": str(src), "seed": seed}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _complete_tokenizer(folder: Path) -> None:
    """Use the shared CLIP BPE files where a config folder has none (the vocabulary is the same in every
    SD text encoder; the pad token, which differs, stays in the folder's own special_tokens_map)."""
    if (folder / "tokenizer.json").is_file():  # a complete fast-tokenizer file (as transformers 5 saves)
        return
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file() or (folder / name).stat().st_size < 1000:  # absent or an LFS pointer
            shutil.copy(shared_data() / "clip-tokenizer" / name, folder / name)


def _module(name: str, folder: Path):
    """fewstep's module for a component, on the meta device (shapes and key names only)."""
    cfg = read_json(folder / "config.json")
    with torch.device("meta"), no_init():
        if name == "unet":
            return UNet(UNetConfig.from_diffusers(cfg))
        if name == "vae":
            return AutoencoderKL(VAEConfig.from_diffusers(cfg))
        return CLIPTextModel(CLIPTextConfig.from_transformers(cfg))


def _write_random(name: str, folder: Path, stem: str, seed: int) -> None:
    module = _module(name, folder)
    norms = {f"{m_name}.{p}" for m_name, m in module.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for p in ("weight", "bias")}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, meta in module.state_dict().items():
        if key in norms:
            sd[key] = torch.ones(meta.shape) if key.endswith("weight") else torch.zeros(meta.shape)
        else:
            sd[key] = torch.randn(meta.shape, generator=g) * 0.02
    save_file(sd, str(folder / f"{stem}.safetensors"))
