"""A CLIP model from local weights, for torchmetrics' CLIPScore and for FID on CLIP image features.

The scores are torchmetrics' (`CLIPScore`: 100 x the cosine of the image and text embeddings, floored at 0;
`FrechetInceptionDistance` with a feature extractor passed in). The weights are a transformers CLIP folder
the user names (e.g. openai/clip-vit-large-patch14, downloaded beforehand): nothing is fetched. FID is
computed on CLIP's image embeddings rather than Inception-v3's pool features: the Inception network that
torchmetrics uses comes from torch-fidelity, which requires torchvision, which this project does not
install (CLIP-feature FID is Kynkäänniemi et al. 2023's "FD_CLIP"; its numbers are not comparable to
Inception FIDs in papers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import FewstepError

NEEDED = ("config.json",)


def _tensor(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput from get_*_features where torchmetrics 1.9 expects the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Clip(nn.Module):
    """transformers' CLIPModel seen the way torchmetrics calls it (features as tensors)."""

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.config = model.config
        self.num_features = model.config.projection_dim  # FID's feature width
        crop = processor.image_processor.crop_size
        self.size = (crop["height"], crop["width"])

    def get_image_features(self, pixel_values: torch.Tensor, **_) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        return _tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] uint8 -> [N, projection_dim]
        """FID's feature extractor: CLIP's image embedding of each image (the processor's resize and crop)."""
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        return self.get_image_features(pixels.to(images.device)).double()


def load_clip(path: str | Path) -> Clip:
    """The CLIP model and processor in the folder `path` (transformers' layout), local files only."""
    folder = Path(path)
    if not folder.is_dir():
        raise FewstepError(f"--clip-model {path}: no such folder; give a transformers CLIP folder, e.g. "
                           "openai/clip-vit-large-patch14 downloaded beforehand (nothing is downloaded here)")
    missing = [n for n in NEEDED if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model.safetensors")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if missing:
        raise FewstepError(f"--clip-model {path}: missing {', '.join(missing)} (a transformers CLIP folder, as "
                           "save_pretrained writes it)")
    from transformers import CLIPModel, CLIPProcessor  # lazy: optional (pip install 'fewstep[eval]')
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FewstepError(f"--clip-model {path}: not a CLIP model ({str(e).splitlines()[0]})") from None
    return Clip(model, processor)


def square(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8: the image resized (shorter side) and centre-cropped to CLIP's input, so images of
    any size stack into one batch."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.convert("RGB").resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                                        Image.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return torch.from_numpy(np.array(image.crop((left, top, left + w, top + h)))).permute(2, 0, 1).contiguous()
