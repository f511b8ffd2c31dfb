"""Stage 2: a tiny CLIP, trained contrastively on rendered scenes and their captions.

Follows Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision": a text transformer (fewstep's CLIPTextModel, pooled at EOS) and an image tower
projected into one embedding space, trained with the symmetric InfoNCE loss and a learned
temperature. The text transformer becomes the frozen prompt encoder of the diffusion models (its
per-token last hidden states are the UNet's cross-attention context). The image tower is a small
conv net, not a ViT; it is kept, with the text projection, in `clip/image_tower.safetensors` as
the CLIP-score and FID-feature model (`load_clip`, `clip_score`, `TinyCLIP.features`).

Captions are at most ~24 tokens, so training runs the transformer on the first L positions only:
attention is causal, so the EOS state it pools is the same as with all `Sizes.context` positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..configs import CLIPTextConfig, read_json
from ..models.clip import CLIPTextModel
from .common import EMA, batches, count, images_to_tensor, save_weights, seed_for, set_lr, warmup_lr, write_json
from .loop import Hyper, Stage
from .sizes import Sizes


class ImageTower(nn.Module):
    """Images area-resized to 64x64 (flat shapes lose nothing that matters, and it is 4x cheaper),
    stride-2 conv / GroupNorm / SiLU stages, pooled to a 4x4 grid (positions matter in the
    captions, so no global pooling), flattened and projected: [N, 3, H, W] -> [N, embed]."""

    side = 64

    def __init__(self, channels: tuple[int, ...], embed: int):
        super().__init__()
        layers, cin = [], 3
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            cin = c
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(cin * 16, embed)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        return self.pool(self.convs(x)).flatten(1)  # [N, C * 16]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


class TinyCLIP(nn.Module):
    """Text encoder + projection and image tower, sharing one embedding space."""

    def __init__(self, text: CLIPTextConfig, channels: tuple[int, ...], embed: int):
        super().__init__()
        self.text = CLIPTextModel(text)
        self.text_projection = nn.Linear(text.hidden_size, embed, bias=False)
        self.visual = ImageTower(channels, embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(ids).pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID features: the image tower's pooled grid before projection, [N, C * 16]."""
        return self.visual.features(images)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch; the temperature is clamped at 100 as in CLIP."""
        img, txt = self.encode_image(images), self.encode_text(ids)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T  # [B, B]
        target = torch.arange(len(ids), device=ids.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def tower_state(self) -> dict:
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if not k.startswith("text.")}


def text_config(sizes: Sizes, tokenizer_folder: Path) -> CLIPTextConfig:
    """The text transformer's config: sizes from `Sizes`, vocabulary and token ids from the tokenizer."""
    from .tokenizer import BOS, EOS
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
    from ..shapes.render import batch
    images, captions, _ = batch(seed, n, size=size)
    ids = tokenizer(captions)
    length = int((ids == tokenizer.eos_id).int().argmax(dim=1).max()) + 1  # through the last EOS
    return {"images": images_to_tensor(images), "ids": ids[:, :length]}


def train_clip(out: Path, sizes: Sizes, hyper: Hyper, seed: int, resume: bool) -> dict:
    """Train the tiny CLIP; writes OUT/clip/text_encoder/ (transformers layout) and the tower file."""
    from ..tokenizer import CLIPTokenizer
    out = Path(out)
    tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    cfg = text_config(sizes, out / "tokenizer")
    stage = Stage("clip", out, hyper, seed)
    torch.manual_seed(seed)
    model = TinyCLIP(cfg, sizes.tower, sizes.embed)
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


def load_clip(folder: Path) -> tuple[TinyCLIP, object]:
    """The tiny CLIP of a run folder's clip/ (with its tokenizer, from the run's tokenizer/)."""
    from safetensors.torch import load_file

    from ..loading import load_text_encoder
    from ..tokenizer import CLIPTokenizer
    folder = Path(folder)
    text = load_text_encoder(folder / "text_encoder")
    tower = read_json(folder / "image_tower.json")
    model = TinyCLIP(text.cfg, tuple(tower["channels"]), tower["embed"])
    model.text = text
    sd = {k: v.float() for k, v in load_file(str(folder / "image_tower.safetensors")).items()}
    model.load_state_dict({**sd, **{f"text.{k}": v for k, v in text.state_dict().items()}}, strict=True)
    return model.eval().requires_grad_(False), CLIPTokenizer.from_folder(folder.parent / "tokenizer")


@torch.no_grad()
def clip_score(model: TinyCLIP, tokenizer, images, prompts: list[str]) -> torch.Tensor:
    """100 x cosine similarity of each image (uint8 [N, H, W, 3]) with its prompt, [N]."""
    img = model.encode_image(images_to_tensor(np.asarray(images)))
    return 100 * (img * model.encode_text(tokenizer(prompts))).sum(-1)


@torch.no_grad()
def retrieval_accuracy(model: TinyCLIP, tokenizer, sizes: Sizes, n: int = 256) -> float:
    """Fraction of fresh scenes whose own caption is the best match among the n (image -> text)."""
    b = clip_step_data(tokenizer, n, sizes.image, seed_for(12345, "clip", 0))
    model = model.eval()
    sims = model.encode_image(b["images"]) @ model.encode_text(b["ids"]).T
    return float((sims.argmax(1) == torch.arange(n)).float().mean())
