"""Encoding of released images: deterministic bytes, no metadata; then, when content
credentials are configured, the signed C2PA manifest (service.credentials)."""

from __future__ import annotations

import enum
import io
from typing import Protocol

import numpy as np
from PIL import Image

from service.errors import FilterFailure, SigningFailure
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


def deliver(image: np.ndarray, jpeg_quality: int) -> tuple[np.ndarray, bytes | None]:
    """The pixels a caller will decode, and the bytes that carry them when the encoding is
    lossy. JPEG moves pixels enough to move a face's similarity (up to +0.29 on 64 px
    faces at quality 90, and down as far), so the engine checks the decoded JPEG as well
    as the generator's pixels, and exactly these bytes are released. `jpeg_quality` 0:
    lossless (PNG)."""
    if jpeg_quality == 0:
        return image, None
    data = encode_image(image, ImageFormat.JPEG, jpeg_quality)
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8), data


def encode_released(
    image: np.ndarray,
    image_format: ImageFormat,
    jpeg_quality: int,
    signer: ContentSigner | None,
    facts: ReleaseFacts | None,
    delivered: bytes | None = None,
) -> bytes:
    """The bytes that leave the service: `delivered` (the lossy bytes whose decoded pixels
    the filter checked, see `deliver`), else `image` encoded losslessly. With a signer,
    they are signed or nothing is returned: any failure is a SigningFailure, never the
    unsigned bytes. Signing changes the bytes (each manifest has its own id and
    signature), not the pixels."""
    if (delivered is None) != (image_format is ImageFormat.PNG):
        # A lossy encoding made here would release pixels the filter never saw.
        raise FilterFailure(f"the checked bytes do not fit a {image_format.value} release")
    data = delivered if delivered is not None else encode_image(image, image_format, jpeg_quality)
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
