"""Encoding of released images: deterministic bytes, no metadata."""

from __future__ import annotations

import enum
import io

import numpy as np
from PIL import Image


class ImageFormat(enum.StrEnum):
    PNG = "png"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"


def encode_image(image: np.ndarray, image_format: ImageFormat, jpeg_quality: int) -> bytes:
    """Encode deterministically: no timestamps or metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format is ImageFormat.PNG:
        pil.save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        pil.save(buffer, format="JPEG", quality=jpeg_quality, optimize=False)
    return buffer.getvalue()
