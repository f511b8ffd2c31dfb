"""The tiny CLIP of the built-in shapes world: a text transformer and a small conv image tower in one
embedding space (Radford et al. 2021), the scorer of `fewstep eval` (CLIP score, Fréchet features).

Trained by `fewstep.train.clip`; shipped in fewstep/assets/shapes-clip. The image tower is a conv net,
not a ViT: images area-resized to 64x64, stride-2 stages, pooled to a 4x4 grid (positions matter in
the captions), flattened and projected.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..configs import CLIPTextConfig, read_json
from ..imaging import from_uint8
from ..loading.folders import load_text_encoder
from ..models.clip import CLIPTextModel
from ..tokenizer import CLIPTokenizer


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

    def tower_state(self) -> dict:
        sd = self.state_dict()
        return {k: v for k, v in sd.items() if not k.startswith("text.")}


def load_clip(folder: Path) -> tuple[TinyCLIP, object]:
    """The tiny CLIP of a run folder's clip/ (with its tokenizer, from the run's tokenizer/)."""
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
    img = model.encode_image(from_uint8(np.asarray(images)))
    return 100 * (img * model.encode_text(tokenizer(prompts))).sum(-1)
