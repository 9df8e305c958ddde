"""Decode any image file or byte string to an RGB uint8 array, safely.

EXIF orientation is applied, every PIL mode becomes RGB (alpha is composited on
white, 16-bit and float images are rescaled), and size limits stop decompression
bombs before they allocate. `filter.content` uses the same conversion for every frame,
page and thumbnail of a file.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from filter.colour_views import ColourTransform, colour_transform, visible
from filter.errors import ImageError
from filter.pil_quirks import (
    PREMULTIPLIED,
    over,
    padded_palette_view,
    premultiplied,
    prepare_frame,
    scaled_views,
    straight_colour,
)

# What PIL's decoders raise on hostile or broken files (fuzzed in tests/loopback/test_fuzz.py): each
# means the image cannot be decoded, never a bug of ours.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    OverflowError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Formats whose frames (pages) are images of their own: each is checked, and enrolled.
FRAME_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF"})


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000  # per image, and for all the images of one file together
    max_images: int = 64  # frames, pages and thumbnails checked in one file


# Decoded pixels that one filter call holds at most (check, index build): one image at
# the decoder's limit, or sixteen 2,000 x 2,000 photos (3 bytes each: 192 MB). The filter's
# own working memory is bounded apart from it (filter/faces.py, DETECT_BATCH_PIXELS).
BATCH_PIXELS = 64_000_000


def read_image_bytes(source: bytes | Path | str, limits: ImageLimits) -> bytes:
    """The bytes of a file (or the bytes given), within the size limit; ImageError if not."""
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
    return data


@contextmanager
def opened_image(data: bytes, limits: ImageLimits) -> Iterator[Image.Image]:
    """PIL's view of the bytes, with the pixel limit checked before anything decodes and
    PIL's errors turned into ImageError (the message names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_pixels(img, limits)
                prepare_frame(img)
                yield img
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("not a recognised image format, or the image is too large") from None
    except DECODE_ERRORS as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def check_pixels(img: Image.Image, limits: ImageLimits) -> None:
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} pixels, over the limit of {limits.max_pixels}")


def decode_image(source: bytes | Path | str, limits: ImageLimits | None = None) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array of the first frame; raise ImageError naming the
    problem. (Enrolment, calibration and evaluation see this frame; what a released file
    must hold besides it is `filter.content`'s to account for.)"""
    limits = limits or ImageLimits()
    data = read_image_bytes(source, limits)
    with opened_image(data, limits) as img:
        img.load()
        return frame_views(img).shown


def decode_frames(
    source: bytes | Path | str, limits: ImageLimits | None = None
) -> tuple[list[np.ndarray], str | None]:
    """Every frame (page) of an image file, each as `decode_image` gives the first: what
    enrolment reads, since a training image's later pages show people too. ImageError if
    the first frame cannot be decoded. Later frames are read while they decode and stay
    within the limits (`limits.max_images` frames, `limits.max_pixels` together); the
    second value says why the rest were not (None: every frame was read)."""
    limits = limits or ImageLimits()
    data = read_image_bytes(source, limits)
    with opened_image(data, limits) as img:
        img.load()
        frames = [frame_views(img).shown]
        total = int(getattr(img, "n_frames", 1)) if img.format in FRAME_FORMATS else 1
        pixels = frames[0].shape[0] * frames[0].shape[1]
        for index in range(1, total):
            if index >= limits.max_images:
                return frames, f"frames {index + 1}-{total} not read: over {limits.max_images}"
            try:
                img.seek(index)
                prepare_frame(img)
                width, height = img.size
                if pixels + width * height > limits.max_pixels:
                    return frames, (
                        f"frames {index + 1}-{total} not read: over {limits.max_pixels} "
                        "pixels together"
                    )
                img.load()
                frames.append(frame_views(img).shown)
            except DECODE_ERRORS as exc:
                return frames, f"frames {index + 1}-{total} not read: frame {index + 1}: {exc}"
            pixels += frames[-1].shape[0] * frames[-1].shape[1]
        return frames, None


@dataclass(frozen=True)
class FrameViews:
    """One frame as the filter sees it (`shown`: EXIF-oriented, every mode as 8-bit RGB,
    transparency composited on white), the other ways viewers show the same frame
    (`others`, named), and what about it cannot be shown here (`problems`)."""

    shown: np.ndarray
    others: tuple[tuple[str, np.ndarray], ...] = ()
    problems: tuple[str, ...] = ()


def frame_views(img: Image.Image) -> FrameViews:
    """The current frame's views. With pixels that are not opaque: also the colour
    channels under them (a program that drops the alpha channel shows them) and the frame
    over black (a dark page or viewer shows white drawn on transparency: a face drawn in
    the alpha channel alone is blank over white). With a colour profile (ICC, or PNG
    gAMA/cHRM) that changes what a viewer shows: also each of those as managed, the colour
    managed before it is composited, as viewers do. Where PIL decodes other than viewers
    show (filter.pil_quirks): premultiplied alpha composited as such, float samples also
    clamped to 0..1, palette indices past a PNG's PLTE also padded as Chrome pads them,
    and `problems` for what cannot be shown here."""
    # No needless copies: at the pixel limit each is 256 MB (PIL keeps RGB in 4 bytes a
    # pixel), and exif_transpose copies even an image it does not turn.
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img) or img
    problems: list[str] = []
    others: list[tuple[str, np.ndarray]] = []
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        info = dict(img.info)  # the profile and gamma hold for the rescaled pixels too
        transparent = info.pop("transparency", None)
        img, samples, extra = scaled_views(img)
        others += [(name, _rgb_array(view.convert("RGB"))) for name, view in extra]
        if isinstance(transparent, int):
            # A 16-bit grey level is transparent, matched before the samples are scaled.
            opaque = np.where(samples == transparent, 0, 255).astype(np.uint8)
            img = Image.merge("LA", (img, Image.fromarray(opaque, mode="L")))
        img.info.update(info)
    padded = padded_palette_view(img)
    if padded is not None:
        others.append(("palette padded with its last colour", padded))
    transform = colour_transform(img)
    if transform.problem:
        problems.append(transform.problem)
    # (name, managed view, the raw view it is kept beside only where it shows more)
    managed: list[tuple[str, np.ndarray, np.ndarray]] = []
    # tRNS gives RGB and L images a transparent colour as it gives palettes a transparent
    # index: viewers show it as transparent either way.
    if img.info.get(PREMULTIPLIED) and img.mode in ("RGBA", "LA", "La"):
        # Stored premultiplied: composited as such, and what a program that drops the
        # alpha channel shows is the stored colour, not PIL's un-premultiplied one.
        colour, alpha = premultiplied(img)
        shown = over(colour, alpha, 255)
        if int(alpha.min()) < 255:
            over_black = over(colour, alpha, 0)
            others += [("colour under its transparent pixels", colour), ("over black", over_black)]
            if transform.apply is not None:
                # Viewers manage the straight colour, then composite it.
                mixed = Image.fromarray(
                    np.dstack([transform.apply(straight_colour(colour, alpha)), alpha]), "RGBA"
                )
                name = transform.name
                managed += [
                    (name, _rgb_array(_composite(mixed, (255, 255, 255))), shown),
                    (f"{name}, colour under its transparent pixels",
                     transform.apply(colour), colour),
                    (f"{name}, over black", _rgb_array(_composite(mixed, (0, 0, 0))), over_black),
                ]  # fmt: skip
                transform = ColourTransform()  # applied
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        shown = _rgb_array(_composite(rgba, (255, 255, 255)))
        colour = shown
        if int(alpha.min()) < 255:
            colour = np.ascontiguousarray(np.asarray(rgba, dtype=np.uint8)[..., :3])
            over_black = _rgb_array(_composite(rgba, (0, 0, 0)))
            others += [("colour under its transparent pixels", colour), ("over black", over_black)]
            if transform.apply is not None:
                # Viewers manage the colour, then composite it.
                mixed = Image.fromarray(np.dstack([transform.apply(colour), alpha]), "RGBA")
                name = transform.name
                managed += [
                    (name, _rgb_array(_composite(mixed, (255, 255, 255))), shown),
                    (f"{name}, colour under its transparent pixels",
                     np.asarray(mixed, dtype=np.uint8)[..., :3], colour),
                    (f"{name}, over black", _rgb_array(_composite(mixed, (0, 0, 0))), over_black),
                ]  # fmt: skip
                transform = ColourTransform()  # applied
    else:
        shown = colour = _rgb_array(img if img.mode == "RGB" else img.convert("RGB"))
    if transform.apply is not None:
        managed.append((transform.name, transform.apply(colour), shown))
    others += [
        (name, np.ascontiguousarray(view)) for name, view, raw in managed if visible(view, raw)
    ]
    return FrameViews(shown, tuple(others), tuple(problems))


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    ground = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(ground, rgba).convert("RGB")


# Larger images are converted to an array a band of rows at a time.
_BAND_PIXELS = 4_000_000


def _rgb_array(rgb: Image.Image) -> np.ndarray:
    width, height = rgb.size
    if width * height <= _BAND_PIXELS:
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    # NumPy would otherwise take the whole image's bytes from PIL first, a third copy
    # beside PIL's own and the array.
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)), dtype=np.uint8)
    return out


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted for reproducible order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
