"""Decoding one image file safely: sized from its header before any pixel is decoded, first frame only, as RGB.

One decoder serves in-memory datasets, streamed DataLoader workers and `layerwise predict`. PIL reads only the
header when it opens a file, so an image claiming billions of pixels (a decompression bomb: a 130 kB PNG can
declare 32000x32000) is refused before it costs memory. Still images are then decoded by torchvision, as they
always were (the documented results depend on its JPEG decoder); animated ones (GIF, APNG, WebP) by PIL, first
frame only, since torchvision would decode every frame.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from layerwise.errors import LayerwiseError
from layerwise.limits import MAX_IMAGE_PIXELS
from layerwise.safe_io import read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
"""The decoders PIL may use: the formats of IMAGE_EXTENSIONS, and no other parser sees the bytes."""


DECODE_ERRORS = (UnidentifiedImageError, OSError, RuntimeError, ValueError, SyntaxError,
                 EOFError)  # fmt: skip
"""How PIL's and torchvision's decoders fail on a broken file."""


def open_header(raw: bytes) -> Image.Image:
    """PIL's image for the bytes, having read the header only. PIL's own pixel check is off while it opens (it
    refuses above twice its limit, with a message that gives no size); decode_bytes checks against ours."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(raw), formats=FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def checked_header(raw: bytes, name: str) -> Image.Image:
    """PIL's image for the bytes, its header read and its size within LAYERWISE_MAX_IMAGE_PIXELS; one line naming
    `name` otherwise. Nothing is decoded yet."""
    limit = MAX_IMAGE_PIXELS.get()
    try:
        image = open_header(raw)
        width, height = image.size
    except DECODE_ERRORS:
        raise LayerwiseError(f"cannot decode {name}: not a valid image; remove or replace the file") from None
    if width * height > limit:
        raise LayerwiseError(
            f"{name} is {width}x{height} = {width * height:,} pixels, more than "
            f"{MAX_IMAGE_PIXELS.env}={int(limit):,}; raise it if you trust the image"
        )
    return image


def decode_bytes(raw: bytes, name: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB from an encoded image; a one-line error naming `name` for anything else.

    Grayscale, palette and RGBA images become RGB (alpha is dropped, as torchvision's RGB mode does); 16-bit
    images are scaled to 8 bits.
    """
    image = checked_header(raw, name)
    width, height = image.size
    try:
        if image.format == "GIF" or getattr(image, "is_animated", False):  # frame 0 (PIL opens there) alone
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        else:
            pixels = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except DECODE_ERRORS:
        raise LayerwiseError(f"cannot decode {name}: not a valid image; remove or replace the file") from None
    if pixels.dtype != torch.uint8:  # 16-bit PNG
        pixels = TF.to_dtype(pixels, torch.uint8, scale=True)
    if tuple(pixels.shape[1:]) != (height, width):
        raise LayerwiseError(f"cannot decode {name}: its header says {width}x{height} but it holds another size")
    return pixels


def read_image(path: str | Path) -> torch.Tensor:
    """decode_bytes(read_bytes(path)), naming the path."""
    try:
        raw = read_bytes(path)
    except OSError as e:
        raise LayerwiseError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    return decode_bytes(raw, str(path))
