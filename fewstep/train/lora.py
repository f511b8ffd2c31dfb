"""`fewstep train lora`: a LoRA for a model, learned from a folder of images with same-named .txt captions,
saved in the diffusers / PEFT format that diffusers' `load_lora_weights` and fewstep's `load_lora` read.

    fewstep train lora --base MODEL --data FOLDER --rank 8 --out style.safetensors

The adapters are peft's (`inject_adapter_in_model`) on the UNet's attention projections, feed-forward
layers and ResNet convolutions (UNET_TARGETS) and, with `text_encoder=True`, on the text encoder's
attention projections (q/k/v/out_proj); the base weights stay frozen. The images are encoded once (the
VAE's posterior mean) and so are the captions when the text encoder is frozen; each step noises a batch of
them at uniform timesteps and regresses the model's own prediction type (epsilon, v or x0: the loss
diffusers' train_text_to_image_lora.py uses, with its min-SNR weighting and offset noise as options). The
loop is the other stages' (`loop.Stage`: accelerate, progress bar, loss log and plot, checkpoints, exact resume);
its files live in `OUT.train/` beside the output file, which is written last, through a temporary file.
SD 1.x / 2.x-type models (one text encoder, no pooled conditioning); SDXL is refused with a clear error.
Options (docs/lora.md): caption dropout to the empty prompt, a new word's textual-inversion vector learned
beside the adapters (pivotal tuning), and prior preservation by the base model's own predictions.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .. import text
from ..edits import load_image
from ..errors import FewstepError
from ..imaging import from_uint8
from ..loading.embeddings import Embedding, attach
from ..pipeline import load_pipeline
from ..schedules import alphas_cumprod
from .common import batches, descend, generator, seed_for, set_lr, target, warmup_lr
from .loop import Hyper, Stage
from .teacher import diffuse, min_snr_weight, training_noise

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# the attention projections, the feed-forward layers and the ResNet convolutions (LoCon): a new shape is
# drawn by the convolutions as much as it is named by attention (docs/lora.md, "Training a LoRA")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ENCODE_CHUNK = 64  # images / captions encoded per call while caching


def read_folder(folder: str | Path, size: int) -> tuple[np.ndarray, list[str]]:
    """The folder's images (resized and centre-cropped to size x size, uint8 [N, size, size, 3]) and their
    captions (IMAGE.txt beside each IMAGE.png, as kohya's and A1111's trainers read them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FewstepError(f"--data {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FewstepError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    bare = [p.name for p in files if not p.with_suffix(".txt").is_file()]
    if bare:
        raise FewstepError(f"--data {folder}: {len(bare)} of {len(files)} images have no caption file (e.g. "
                           f"{bare[0]} needs {Path(bare[0]).with_suffix('.txt').name})")
    images = np.stack([_square(load_image(p, "training image"), size) for p in files])
    return images, [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in files]


def _square(image, size: int) -> np.ndarray:
    """Scale the short side to `size`, then crop the centre (diffusers' --center_crop)."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), resample=3)  # bicubic
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def add_adapters(pipe, rank: int, alpha: float, text_encoder: bool) -> list[torch.nn.Parameter]:
    """peft LoRA layers on the UNet's UNET_TARGETS (and the text encoder's TEXT_TARGETS); only they train."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: optional (pip install 'fewstep[train]')
    models = [(pipe.unet, UNET_TARGETS)] + ([(pipe.text_encoders[0], TEXT_TARGETS)] if text_encoder else [])
    params = []
    for model, targets in models:
        model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                           init_lora_weights="gaussian"), model)
        params += [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def add_token(pipe, token: str, init_word: str | None) -> torch.nn.Parameter:
    """Pivotal tuning: a one-vector textual-inversion embedding for the new word `token`, its row of the text
    encoder's token table initialised from `init_word` (one token) or the table's mean row. The text encoder
    stays frozen but for that row (its other rows' gradients are masked to zero), so prompts without the word
    are encoded exactly as before. Returns the table's weight for the optimiser."""
    tok, table = pipe.tokenizers[0], pipe.text_encoders[0].text_model.embeddings.token_embedding
    start = table.weight[tok.ids(init_word)[0]] if init_word is not None else table.weight.mean(0)
    pipe.text_encoders[0].requires_grad_(False)
    attach(Embedding(token, {"any": start[None].detach().clone()}), pipe.tokenizers, pipe.text_encoders)
    weight = table.weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1)
    mask[-1] = 1
    weight.register_hook(lambda g: g * mask.to(g))
    return weight


@contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model inside: every peft LoRA layer of `model` switched off, and on again afterwards."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def save_embedding(weight: torch.Tensor, path: Path) -> None:
    """The new word's vector as an A1111 .safetensors embedding (`emb_params: [1, width]`), named by the word."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"emb_params": weight[-1:].detach().float().cpu().contiguous()}, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def lora_state(pipe, text_encoder: bool) -> dict[str, torch.Tensor]:
    """The adapters' weights under diffusers' keys: unet.<module>.lora_A.weight, text_encoder.<module>...."""
    from peft.utils import get_peft_model_state_dict  # lazy: optional (pip install 'fewstep[train]')
    out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    if text_encoder:
        out.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoders[0]).items()})
    return out


def save_lora(state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float, text_encoder: bool) -> None:
    """fp16 safetensors with diffusers' `lora_adapter_metadata` (rank, alpha, targets per component),
    written to a temporary file and renamed: a kill leaves the old file or none, never half a one."""
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": UNET_TARGETS}
    if text_encoder:
        meta.update({"text_encoder.r": rank, "text_encoder.lora_alpha": alpha,
                     "text_encoder.target_modules": TEXT_TARGETS})
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    os.chmod(tmp, 0o644)  # save_file makes it private
    os.replace(tmp, path)


def _check(pipe, out: Path, rank: int) -> None:
    if len(pipe.text_encoders) != 1 or pipe.conditioning.pooled:
        raise FewstepError("fewstep train lora trains SD 1.x / 2.x-type models (one text encoder); this one has "
                           f"{len(pipe.text_encoders)} and pooled conditioning (SDXL): not supported yet")
    if not 1 <= rank <= 256:
        raise FewstepError(f"--rank is 1 to 256, not {rank}")
    if out.suffix != ".safetensors":
        raise FewstepError(f"--out {out}: a LoRA is written as a .safetensors file")
    if not out.parent.is_dir():
        raise FewstepError(f"--out {out}: the folder {out.parent} does not exist")


def _check_token(tok, new_token: str, init_word: str | None) -> None:
    if len(new_token.split()) != 1 or len(tok.ids(new_token)) == 1:
        raise FewstepError(f"--new-token {new_token!r}: give one word the model does not know (not one token of "
                           "its vocabulary)")
    if init_word is not None and len(tok.ids(init_word)) != 1:
        raise FewstepError(f"--init-word {init_word!r} is {len(tok.ids(init_word))} tokens: give a word of one")


@torch.no_grad()
def _cache(pipe, images: np.ndarray, captions: list[str], text_encoder: bool) -> dict:
    """Latents of every image, and the captions' context unless the text encoder trains."""
    latents = torch.cat([pipe.vae.encode(from_uint8(images[i:i + ENCODE_CHUNK]).to(pipe.device)).float().cpu()
                         for i in range(0, len(images), ENCODE_CHUNK)])
    cache = {"latents": latents}
    if not text_encoder:
        cache["context"], cache["empty"] = (
            text.encode(pipe.tokenizers, pipe.text_encoders, pipe.conditioning, [c], pipe.device, torch.float32)[0][0].cpu()
            for c in (captions, [""]))
    return cache


class Trainee(torch.nn.Module):
    """The UNet and text encoder as one module (one `accelerate.prepare`, one DDP under several processes):
    forward(x_t, t, context) with cached contexts, or forward(x_t, t, captions=...) encoding them."""

    def __init__(self, pipe):
        super().__init__()
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoders[0]
        self.tokenizers, self.conditioning = pipe.tokenizers, pipe.conditioning

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                captions: list[str] | None = None) -> torch.Tensor:
        if context is None:
            context = text.encode(self.tokenizers, [self.text_encoder], self.conditioning, [captions], x.device,
                                  torch.float32)[0][0]
        return self.unet(x, t, context)


def train_lora(base: str | None, data: str | Path, out: str | Path, *, rank: int = 8, alpha: float | None = None,
               text_encoder: bool = False, steps: int = 1000, batch: int = 16, lr: float = 1e-3, seed: int = 0,
               resume: bool = False, stop_at: int | None = None, caption_dropout: float = 0.0,
               new_token: str | None = None, init_word: str | None = None, prior: str | None = None,
               snr_gamma: float | None = None, noise_offset: float = 0.0) -> dict:
    """Train a LoRA of `rank` on `base` (a model folder or file; None: the built-in model) from `data`;
    writes `out` when the steps are done (not when `stop_at` ends the run early: resume later). With
    `new_token`, also a textual-inversion vector for that word (`add_token`), written beside `out` as
    TOKEN.safetensors. With `prior` (the concept's word), a caption without that word (or dropped to "")
    regresses the base model's own prediction instead of its image (prior preservation: the LoRA learns the
    word and keeps the rest). `snr_gamma` weights the loss by min-SNR-gamma and `noise_offset` adds a
    per-image, per-channel constant of that std to the noise (diffusers' `--snr_gamma` / `--noise_offset`):
    the built-in teacher's own objective is 5 and 0.1.
    """
    out = Path(out)
    if init_word is not None and not new_token:
        raise FewstepError("--init-word needs --new-token WORD")
    if prior is not None and len(prior.split()) != 1:
        raise FewstepError(f"--prior-preservation {prior!r}: give the one word of the concept")
    pipe = load_pipeline(base)
    _check(pipe, out, rank)
    emb_path = out.with_name(f"{new_token}.safetensors") if new_token else None
    if emb_path == out:
        raise FewstepError(f"--out {out}: the embedding for {new_token!r} is written as {emb_path.name}; name the "
                           "LoRA otherwise")
    if new_token is not None:
        _check_token(pipe.tokenizers[0], new_token, init_word)
    alpha = float(rank if alpha is None else alpha)
    images, captions = read_folder(data, pipe.defaults.size or pipe.unet.cfg.sample_size * pipe.vae_scale)
    encode = text_encoder or new_token is not None  # the captions are encoded at every step
    cache = _cache(pipe, images, captions, encode)
    params = add_adapters(pipe, rank, alpha, text_encoder)
    table = add_token(pipe, new_token, init_word) if new_token else None  # trains beside the adapters
    hyper = Hyper(steps, batch, lr, warmup=min(100, steps // 10), log_every=max(1, min(25, steps // 20)),
                  ckpt_every=max(50, steps // 4), stop_at=stop_at)
    stage = Stage("lora", out.with_name(out.stem + ".train"), hyper, seed)
    optimizer = torch.optim.AdamW(params + ([table] if new_token else []), lr=lr, weight_decay=0.0)
    model, optimizer = stage.accel.prepare(Trainee(pipe), optimizer)
    start = stage.restore(resume)
    ac = alphas_cumprod(pipe.scheduler).to(stage.accel.device)

    def make(step: int) -> dict:
        g = generator(seed_for(seed, "lora", step, stage.rank))
        idx = torch.randint(0, len(images), (stage.per_process,), generator=g)
        latents = cache["latents"][idx]
        if noise_offset:
            noise = training_noise(latents.shape, g, noise_offset)
        else:  # no offset draw, so runs without it draw as before
            noise = torch.randn(latents.shape, generator=g)
        b = {"latents": latents, "noise": noise, "t": torch.randint(0, len(ac), (len(idx),), generator=g)}
        empty = [False] * len(idx)
        if caption_dropout:  # drawn only when asked, so runs without it draw as before
            empty = (torch.rand(len(idx), generator=g) < caption_dropout).tolist()
        texts = ["" if e else captions[i] for i, e in zip(idx.tolist(), empty)]
        if encode:
            b["captions"] = texts
        else:
            b["context"] = torch.where(torch.tensor(empty)[:, None, None], cache["empty"], cache["context"][idx])
        if prior:
            b["prior"] = torch.tensor([prior not in c.split() for c in texts])
        return b

    def step_fn(step: int, b: dict) -> dict:
        set_lr(optimizer, warmup_lr(step, lr, hyper.warmup, steps))
        x = diffuse(b["latents"], b["noise"], b["t"], ac)
        predicted = model(x, b["t"], b.get("context"), b.get("captions"))
        want = target(b, ac, pipe.scheduler.prediction_type)
        if prior and b["prior"].any():  # the base model's own prediction, for the rows without the word only
            rows = b["prior"].nonzero().flatten()
            context, texts = b.get("context"), b.get("captions")
            with torch.no_grad(), adapters_off(model):
                base = model(x[rows], b["t"][rows], None if context is None else context[rows],
                             None if texts is None else [texts[i] for i in rows.tolist()])
            want = want.index_put((rows,), base)
        loss = F.mse_loss(predicted, want, reduction="none").mean((1, 2, 3))
        if snr_gamma:
            loss = loss * min_snr_weight(b["t"], ac, snr_gamma, pipe.scheduler.prediction_type)
        return descend(stage.accel, optimizer, loss.mean())

    model.train()
    done = stage.run(batches(make, start, steps), step_fn)
    result = {"steps": stage.counter.step, "seconds": round(stage.counter.seconds, 1), "images": len(images),
              "parameters": sum(p.numel() for p in params)}
    if done and stage.main:
        save_lora(lora_state(pipe, text_encoder), out, rank, alpha, text_encoder)
        result.update(out=str(out), bytes=out.stat().st_size)
        if new_token:
            save_embedding(table, emb_path)
            result.update(embedding=str(emb_path))
    return result
