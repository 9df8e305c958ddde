"""Decode any image file or byte string to an RGB uint8 array, safely.

EXIF orientation is applied, every PIL mode becomes RGB (alpha is composited on
white, 16-bit and float images are rescaled), and size limits stop decompression
bombs before they allocate.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from filter.errors import ImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000


# Decoded pixels that one filter call holds at most (check, index build): one image at
# the decoder's limit, or sixteen 2,000 x 2,000 photos (3 bytes each: 192 MB). The filter's
# own working memory is bounded apart from it (filter/faces.py, DETECT_BATCH_PIXELS).
BATCH_PIXELS = 64_000_000


def header_pixels(path: Path) -> int:
    """Width x height from the file's header (nothing decoded); 0 if it cannot be read
    (decoding will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                return int(width) * int(height)
    except Exception:  # any unreadable header: decoding says why
        return 0


def decode_image(source: bytes | Path | str, limits: ImageLimits | None = None) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array; raise ImageError naming the problem."""
    limits = limits or ImageLimits()
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
        if size > limits.max_bytes:
            raise ImageError(f"file is {size} bytes, over the limit of {limits.max_bytes}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    else:
        data = source
        if len(data) > limits.max_bytes:
            raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    if not data:
        raise ImageError("file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > limits.max_pixels:
                    raise ImageError(
                        f"image is {width}x{height} pixels, over the limit of {limits.max_pixels}"
                    )
                img.load()
                return _to_rgb_array(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("not a recognised image format, or the image is too large") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    # No needless copies: at the pixel limit each one is 256 MB (PIL keeps RGB in 4 bytes).
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        low, high = float(arr.min()), float(arr.max())
        scaled = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    width, height = rgb.size
    if width * height <= _BAND_PIXELS:
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    # A large image a band of rows at a time: NumPy would otherwise take the whole image's
    # bytes from PIL first, a third copy beside PIL's own and the array.
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)), dtype=np.uint8)
    return out


_BAND_PIXELS = 4_000_000


_EXIF_THUMBNAIL_OFFSET = 0x0201  # JPEGInterchangeFormat, in IFD1


def unchecked_content(data: bytes) -> str | None:
    """Why these bytes hold a picture `decode_image` does not show the filter, or None.

    The filter sees one RGB frame: the first frame, EXIF-rotated, transparency over white.
    A copy of the original bytes must hold nothing else: later frames (GIF, WebP, APNG,
    TIFF pages, MPO), colour under transparent pixels (which `convert("RGB")` reveals) and
    an EXIF thumbnail would all leave unchecked. Callers that release the original bytes
    refuse such files; the bytes must already have passed `decode_image`.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1:
                return f"it holds {frames} frames and only the first can be checked"
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                alpha = np.asarray(img.convert("RGBA").getchannel("A"))
                if int(alpha.min()) < 255:
                    return "it has transparent pixels, whose colours the filter does not see"
            thumbnail = img.getexif().get_ifd(ExifTags.IFD.IFD1)
            if _EXIF_THUMBNAIL_OFFSET in thumbnail:
                return "it carries an EXIF thumbnail, which the filter does not see"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"its content cannot be inspected: {exc}"
    return None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted for reproducible order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
