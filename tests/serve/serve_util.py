"""Helpers of the server tests: base64 PNGs both ways, as A1111's API carries images."""

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def b64_png(image: Image.Image, parameters: str | None = None) -> str:
    """An image as the API sends it: base64 PNG with the `parameters` text chunk (the image's own by default)."""
    meta = PngInfo()
    meta.add_text("parameters", image.info.get("parameters", "") if parameters is None else parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_claiming(width: int, height: int) -> str:
    """A base64 PNG whose header says width x height (its data is one pixel's): a decompression bomb's shape."""
    raw = io.BytesIO()
    Image.new("RGB", (1, 1)).save(raw, format="PNG")
    data = raw.getvalue()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return base64.b64encode(data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]).decode()
