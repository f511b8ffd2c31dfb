"""Writing generated images: where they go, and the file itself.

A1111's conventions: an output folder numbers images `00000-SEED.png` after the highest number already
there; a PNG carries the generation settings in its `parameters` text chunk, a JPEG or WebP in the EXIF
UserComment (UTF-16, "UNICODE" prefix), which A1111's PNG Info reads back. Every file is written to a
temporary name in its folder and renamed into place, so an interrupted run never leaves a partial
image, and where it will go is checked for writability before any work starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from .errors import FewstepError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
USER_COMMENT = 0x9286  # EXIF UserComment, in the Exif IFD
UNICODE = b"UNICODE\0"  # the UserComment character-code prefix for UTF-16 text


def plan(output: str | Path, seeds: list[int]) -> list[Path]:
    """The files for images with these seeds: `output` itself (an image path; -i before the suffix when
    there are several), or numbered `NNNNN-SEED.png` files in the folder `output`. Checks, before any
    work, that the place can be written."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix and suffix not in FORMATS and suffix in Image.registered_extensions():
        raise FewstepError(f"--output {output}: {suffix} images are not written; use .png, .jpg or .webp, or a folder")
    if suffix in FORMATS and not out.is_dir():
        writable(out.parent)
        return [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(seeds))]
    writable(out)
    taken = [int(m.group(1)) for f in (out.iterdir() if out.is_dir() else ()) if (m := re.match(r"(\d{5})-", f.name))]
    start = max(taken, default=-1) + 1
    return [out / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def writable(folder: Path) -> None:
    """A one-line error unless files can be created in `folder` (or in the nearest existing folder above
    it, where it will be made): tried with a temporary file, which also catches read-only and special
    file systems that permission bits do not show."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FewstepError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise FewstepError(f"cannot write to {folder}: {e.strerror or e} (choose another --output)") from None


def save_image(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write `image` to `path` atomically in the format of its suffix (PNG when it has none), with the
    generation settings (`parameters`, by default the image's own `info["parameters"]`)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower(), "PNG")
    text = image.info.get("parameters") if parameters is None else parameters
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **_metadata(fmt, text))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); a saved image is not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _metadata(fmt: str, text: str | None) -> dict:
    if text is None:
        return {}
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", text)
        return {"pnginfo": info}
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[USER_COMMENT] = UNICODE + text.encode("utf-16-be")
    return {"exif": exif, "quality": 95}


def read_parameters(path: str | Path) -> str | None:
    """The generation settings an image file carries (PNG text chunk, or EXIF UserComment), or None."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE):
        return comment[len(UNICODE):].decode("utf-16-be")
    return None
