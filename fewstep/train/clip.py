"""Stage 2: a tiny CLIP, trained contrastively on rendered scenes and their captions.

Follows Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision": a text transformer (fewstep's CLIPTextModel, pooled at EOS) and an image tower
projected into one embedding space, trained with the symmetric InfoNCE loss and a learned
temperature. The text transformer becomes the frozen prompt encoder of the diffusion models (its
per-token last hidden states are the UNet's cross-attention context). The image tower is a small
conv net, not a ViT; it is kept, with the text projection, in `clip/image_tower.safetensors` as
the CLIP-score and FID-feature model (`fewstep.shapes.clip`: `load_clip`, `clip_score`, `TinyCLIP.features`).

Captions are at most ~24 tokens, so training runs the transformer on the first L positions only:
attention is causal, so the EOS state it pools is the same as with all `Sizes.context` positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..configs import CLIPTextConfig, read_json
from ..imaging import from_uint8
from ..shapes.clip import TinyCLIP
from ..shapes.data import batch
from ..tokenizer import CLIPTokenizer
from .common import EMA, batches, count, save_weights, seed_for, set_lr, warmup_lr, write_json
from .loop import Hyper, Stage
from .sizes import Sizes
from .tokenizer import BOS, EOS


class ContrastiveCLIP(TinyCLIP):
    """The tiny CLIP as it trains: its forward is the loss (what a data-parallel wrapper calls)."""

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch; the temperature is clamped at 100 as in CLIP."""
        img, txt = self.encode_image(images), self.encode_text(ids)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # [B, B]
        target = torch.arange(len(ids), device=ids.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def text_config(sizes: Sizes, tokenizer_folder: Path) -> CLIPTextConfig:
    """The text transformer's config: sizes from `Sizes`, vocabulary and token ids from the tokenizer."""
    vocab = read_json(Path(tokenizer_folder) / "vocab.json")
    return CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=sizes.context, hidden_act="quick_gelu",
                          bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], **sizes.text)


def transformers_config(cfg: CLIPTextConfig, dtype: str = "float32") -> dict:
    """config.json of a transformers CLIPTextModel with these sizes."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "dropout": 0.0, "hidden_act": cfg.hidden_act, "hidden_size": cfg.hidden_size,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
            "layer_norm_eps": cfg.layer_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
            "projection_dim": cfg.hidden_size, "vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": dtype}


def clip_step_data(tokenizer, n: int, size: int, seed: int) -> dict:
    images, captions, _ = batch(seed, n, size=size)
    ids = tokenizer(captions)
    length = int((ids == tokenizer.eos_id).int().argmax(dim=1).max()) + 1  # through the last EOS
    return {"images": from_uint8(images), "ids": ids[:, :length]}


def train_clip(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Train the tiny CLIP; writes OUT/clip/text_encoder/ (transformers layout) and the tower file."""
    out = Path(out)
    tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    cfg = text_config(sizes, out / "tokenizer")
    stage = Stage("clip", out, hyper, seed)
    torch.manual_seed(seed)
    model = ContrastiveCLIP(cfg, sizes.tower, sizes.embed)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=0.01)
    model, opt = stage.accel.prepare(model, opt)
    ema = EMA(stage.accel.unwrap_model(model), 0.99)
    stage.track(ema)
    start = stage.restore(resume)

    def make(step: int) -> dict:
        return clip_step_data(tokenizer, stage.per_process, sizes.image, seed_for(seed, "clip", step, stage.rank))

    def step_fn(step: int, b: dict) -> dict:
        set_lr(opt, warmup_lr(step, hyper.lr, hyper.warmup, hyper.steps))
        loss = model(b["images"], b["ids"])
        opt.zero_grad(set_to_none=True)
        stage.accel.backward(loss)
        opt.step()
        ema.update(stage.accel.unwrap_model(model), step)
        return {"loss": loss.item()}

    if stage.main:
        print(f"clip: text encoder {count(stage.accel.unwrap_model(model).text) / 1e6:.2f}M parameters, "
              f"image tower {count(stage.accel.unwrap_model(model).visual) / 1e6:.2f}M", flush=True)
    done = stage.run(batches(make, start, hyper.steps, hyper.workers), step_fn)
    if done and stage.main:
        final = stage.accel.unwrap_model(model)
        final.load_state_dict(ema.shadow)
        final = final.cpu()  # the retrieval check renders on the CPU
        save_clip(out / "clip", final, sizes)
        retrieval = retrieval_accuracy(final, tokenizer, sizes)
        print(f"clip: retrieval accuracy on 256 fresh scenes {retrieval:.3f}", flush=True)
        return {"retrieval": round(retrieval, 4)}
    return {}


def save_clip(folder: Path, model: TinyCLIP, sizes: Sizes) -> None:
    folder = Path(folder)
    save_weights({f"text_model.{k[len('text.text_model.'):]}": v for k, v in model.state_dict().items()
                  if k.startswith("text.text_model.")}, folder / "text_encoder" / "model.safetensors")
    write_json(folder / "text_encoder" / "config.json", transformers_config(model.text.cfg))
    save_weights(model.tower_state(), folder / "image_tower.safetensors")
    write_json(folder / "image_tower.json", {"channels": list(sizes.tower), "embed": sizes.embed})


@torch.no_grad()
def retrieval_accuracy(model: TinyCLIP, tokenizer, sizes: Sizes, n: int = 256) -> float:
    """Fraction of fresh scenes whose own caption is the best match among the n (image -> text)."""
    b = clip_step_data(tokenizer, n, sizes.image, seed_for(12345, "clip", 0))
    model = model.eval()
    sims = model.encode_image(b["images"]) @ model.encode_text(b["ids"]).T
    return float((sims.argmax(1) == torch.arange(n)).float().mean())
