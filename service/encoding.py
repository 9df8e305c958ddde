"""Encoding of released images: deterministic bytes, no metadata; then, when content
credentials are configured, the signed C2PA manifest (service.credentials)."""

from __future__ import annotations

import enum
import io
from typing import Protocol

import numpy as np
from PIL import Image

from service.errors import SigningFailure
from service.provenance import ReleaseFacts


class ImageFormat(enum.StrEnum):
    PNG = "png"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"


class ContentSigner(Protocol):
    """Adds content credentials to encoded image bytes (blocking; run off the loop)."""

    def sign(self, data: bytes, media_type: str, facts: ReleaseFacts) -> bytes: ...


def encode_image(image: np.ndarray, image_format: ImageFormat, jpeg_quality: int) -> bytes:
    """Encode deterministically: no timestamps or metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format is ImageFormat.PNG:
        pil.save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        pil.save(buffer, format="JPEG", quality=jpeg_quality, optimize=False)
    return buffer.getvalue()


def encode_released(
    image: np.ndarray,
    image_format: ImageFormat,
    jpeg_quality: int,
    signer: ContentSigner | None,
    facts: ReleaseFacts | None,
) -> bytes:
    """The bytes that leave the service. With a signer, they are signed or nothing is
    returned: any failure is a SigningFailure, never the unsigned bytes. Signing changes
    the bytes (each manifest has its own id and signature), not the pixels."""
    data = encode_image(image, image_format, jpeg_quality)
    if signer is None:
        return data
    if facts is None:
        raise SigningFailure("the filter that checked this image is unknown; not signing it")
    try:
        return signer.sign(data, image_format.media_type, facts)
    except SigningFailure:
        raise
    except Exception as exc:
        raise SigningFailure(f"content signer failed: {type(exc).__name__}: {exc}") from exc
