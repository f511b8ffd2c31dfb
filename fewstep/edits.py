"""The inputs of image-conditioned generation: the source image and the mask, prepared as diffusers'
VaeImageProcessor prepares them, with A1111's inpainting options around them, and outpainting's canvas.

- Images come as PIL images, file paths, numpy arrays or tensors ([3, H, W] or [1, 3, H, W], in [0, 1],
  or in [-1, 1] when they hold negative values, as diffusers reads them). Transparency is flattened onto
  white (A1111's default background), 16-bit images are scaled to 8 bits, greyscale becomes RGB.
- Resizing is Lanczos (diffusers' `resize`), to the generation size: by default the image's own size
  rounded down to a multiple of 8, with a one-line notice when that changes it.
- A mask is greyscale; white (>= 0.5 after resizing) is repainted, black kept, binarized as diffusers'
  mask processor does. A1111's options: `mask_blur` (a Gaussian blur of that many pixels before
  binarizing; the blurred mask is the alpha of the paste-back), an inverted mask, `padding_mask_crop`
  ("inpaint only masked": work on the mask's bounding box plus this padding, expanded to the generation
  size's aspect ratio and resized to it, then pasted back), `overlay` (the original's pixels outside the
  mask, exactly), and the masked content to start from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import FewstepError

MAX_PIXELS = 2**26  # 67 million: a source larger than this is refused before it is decoded
FILLS = ("original", "latent noise", "latent nothing")  # A1111's "masked content"


@dataclass(frozen=True)
class Edit:
    """An image-conditioned request's source, resolved: what the pipeline starts from and pastes back."""

    image: torch.Tensor = field(compare=False)  # [1, 3, H, W] in [-1, 1], at the generation size (the crop)
    mask: torch.Tensor | None = field(compare=False)  # [1, 1, H, W] in {0, 1}, 1 = repaint; None: image to image
    strength: float = 1.0
    fill: str = "original"
    source: Image.Image | None = field(default=None, compare=False)  # the whole original, for pasting back
    alpha: Image.Image | None = field(default=None, compare=False)  # the (blurred) mask, at the source's size
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) in the source, padding_mask_crop
    overlay: bool = False
    mask_blur: int = 0
    padding: int | None = None
    inverted: bool = False


def load_image(source, what: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image, a path, a numpy array or a tensor (see the module docstring)."""
    if isinstance(source, torch.Tensor):
        return _from_tensor(source, what)
    if isinstance(source, np.ndarray):
        return _from_tensor(torch.from_numpy(source.astype(np.float32) / (255 if source.dtype == np.uint8 else 1))
                            .permute(*((2, 0, 1) if source.ndim == 3 else (0, 1))), what)
    if isinstance(source, (str, Path)):
        source = _open(Path(source), what)
    if not isinstance(source, Image.Image):
        raise FewstepError(f"{what} must be a PIL image, a file path, a numpy array or a tensor, "
                           f"not {type(source).__name__}")
    return to_rgb(source)


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FewstepError(f"{what} {path}: no such file")
    try:
        image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            raise FewstepError(f"{what} {path} is {image.width}x{image.height}: more than {MAX_PIXELS} pixels")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise FewstepError(f"{what} {path} is not an image fewstep can read ({type(e).__name__})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white and 16- or 32-bit greyscale scaled to 8 bits."""
    if image.width * image.height > MAX_PIXELS:
        raise FewstepError(f"the image is {image.width}x{image.height}: more than {MAX_PIXELS} pixels")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def _from_tensor(x: torch.Tensor, what: str) -> Image.Image:
    x = x.detach().float().cpu()
    x = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4) or not torch.isfinite(x).all():
        raise FewstepError(f"{what} tensor of shape {tuple(x.shape)}: expected finite [3, H, W] or [1, 3, H, W] "
                           "values in [0, 1] (or [-1, 1])")
    x = (x / 2 + 0.5) if x.min() < 0 else x  # diffusers reads tensors with negative values as [-1, 1]
    a = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return to_rgb(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a))


def load_mask(source) -> Image.Image:
    """A greyscale mask ("L") from the same kinds of source as an image."""
    if isinstance(source, Image.Image) and source.mode in ("L", "1"):
        return source.convert("L")
    return load_image(source, "mask_image").convert("L")


def generation_size(image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
    """The size to generate at: as asked, or the image's rounded down to a multiple of 8 (said in a notice)."""
    w, h = (image.width // 8 * 8 if width is None else width), (image.height // 8 * 8 if height is None else height)
    if (width is None and w != image.width) or (height is None and h != image.height):
        warnings.warn(f"the image is {image.width}x{image.height}: generating at {w}x{h}, a multiple of 8", stacklevel=4)
    return w, h


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] in [-1, 1], Lanczos-resized as diffusers' image processor does."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 1, height, width] in {0, 1}: resized (Lanczos) and binarized at 0.5, as diffusers' mask processor."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    return (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255) >= 0.5).float()[None, None]


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The mask's bounding box plus `pad` pixels, grown to the aspect ratio of width x height and kept inside
    the image (A1111's "inpaint only masked"): (left, top, right, bottom)."""
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        raise FewstepError("mask_image is all black: nothing to repaint")
    left, top = max(box[0] - pad, 0), max(box[1] - pad, 0)
    right, bottom = min(box[2] + pad, mask.width), min(box[3] + pad, mask.height)
    w, h = right - left, bottom - top
    want_w, want_h = max(w, round(h * width / height)), max(h, round(w * height / width))
    left, top = _centred(left, w, want_w, mask.width), _centred(top, h, want_h, mask.height)
    return left, top, left + min(want_w, mask.width), top + min(want_h, mask.height)


def _centred(start: int, size: int, want: int, limit: int) -> int:
    """Where a span of `want` starts when grown evenly around [start, start + size), kept in [0, limit)."""
    return int(min(max(start - (want - size) // 2, 0), max(limit - want, 0)))


def paste(generated: Image.Image, edit: Edit) -> Image.Image:
    """The generated image put back as the options ask: into the crop's place (padding_mask_crop), and
    with the original kept outside the mask (overlay, or always for a crop), the blurred mask as alpha."""
    if edit.crop is None and not edit.overlay:
        return generated
    source, alpha = edit.source, edit.alpha
    if edit.crop is not None:
        left, top, right, bottom = edit.crop
        placed = source.copy()
        placed.paste(generated.resize((right - left, bottom - top), Image.LANCZOS), (left, top))
        generated = placed
    elif generated.size != source.size:
        source, alpha = source.resize(generated.size, Image.LANCZOS), alpha.resize(generated.size, Image.LANCZOS)
    return Image.composite(generated, source, alpha)


def prepare(image, mask_image, strength: float, width: int | None, height: int | None, *, mask_blur: int = 0,
            invert_mask: bool = False, padding_mask_crop: int | None = None, overlay: bool = False,
            fill: str = "original") -> tuple[Edit, int, int]:
    """The Edit of these inputs and the generation size (see the module docstring)."""
    source = load_image(image)
    width, height = generation_size(source, width, height)
    if mask_image is None:
        if padding_mask_crop is not None or overlay or mask_blur or invert_mask or fill != "original":
            raise FewstepError("mask_blur, invert_mask, padding_mask_crop, overlay and the masked content need a "
                               "mask_image (inpainting)")
        return Edit(image_tensor(source, width, height), None, strength, source=source), width, height
    alpha = _mask(load_mask(mask_image), source.size, mask_blur, invert_mask)
    crop = None if padding_mask_crop is None else crop_region(alpha, width, height, padding_mask_crop)
    cut, cut_mask = (source, alpha) if crop is None else (source.crop(crop), alpha.crop(crop))
    edit = Edit(image_tensor(cut, width, height), mask_tensor(cut_mask, width, height), strength, fill, source, alpha,
                crop, overlay, mask_blur, padding_mask_crop, invert_mask)
    return edit, width, height


def _mask(mask: Image.Image, size: tuple[int, int], blur: int, invert: bool) -> Image.Image:
    if mask.size != size:
        warnings.warn(f"mask_image is {mask.width}x{mask.height} and the image {size[0]}x{size[1]}: "
                      "resizing the mask to the image", stacklevel=5)
        mask = mask.resize(size, Image.LANCZOS)
    mask = ImageOps.invert(mask) if invert else mask
    if mask.getextrema() == (0, 0):
        raise FewstepError("mask_image is all black (nothing to repaint): paint the region to repaint white")
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def outpaint_canvas(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    blur: int = 8) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas grown by these margins (each rounded up to a multiple of 8), the new area
    filled by stretching the border pixels outwards, and the mask of what to paint: the margins, reaching
    `blur` pixels into the image so the seam is repainted too."""
    image = load_image(image)
    margins = [-(-max(int(m), 0) // 8) * 8 for m in (left, right, top, bottom)]
    if not any(margins):
        raise FewstepError("outpaint: give at least one of left, right, top, bottom")
    left, right, top, bottom = margins
    w, h = image.width + left + right, image.height + top + bottom
    a = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, np.uint8)
    keep = (slice(top + (blur if top else 0), top + image.height - (blur if bottom else 0)),
            slice(left + (blur if left else 0), left + image.width - (blur if right else 0)))
    mask[keep] = 0
    return Image.fromarray(a), Image.fromarray(mask, "L")
