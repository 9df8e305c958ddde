"""Where PIL decodes a frame other than viewers show it, and what facegate does about it.

Each case was found by building the file and comparing PIL's pixels with libpng's,
libtiff's or a browser's (tests/unit/test_colour_views.py, tests/unit/test_pil_quirks.py):

- a PNG's transparent colour (tRNS) that PIL never matches: scaled here, or dropped
  where PIL decodes 16-bit colour to 8 bits (such a file is unaccounted by
  filter.container_png);
- a TIFF with associated (premultiplied) alpha, which PIL un-premultiplies, losing the
  colour stored under transparent pixels: decoded as stored here, composited as
  premultiplied by `filter.images.frame_views` (TIFF layouts PIL cannot show as viewers
  do are unaccounted by filter.container_tiff);
- palette indices past the end of a PNG's PLTE, black in PIL and libpng and the table's
  last colour in Skia (Chrome): both are checked (`padded_palette_view`);
- a BMP's embedded ICC profile, which PIL does not read: read here, so that its managed
  view is checked (what else of a BMP PIL does not show: filter/container_bmp.py);
- float and 32-bit samples with NaN, infinities or a far outlier, which PIL leaves to the
  caller's scaling: scaled over finite values, and float samples also as viewers clamp
  them to 0..1 (`scaled_views`).

`prepare_frame` runs before a frame decodes (PIL's tile still names its raw mode), after
every seek: an APNG's rewind restores the info as read, and a TIFF's next page may differ.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from filter.container_bmp import embedded_profile

# Set in a frame's info by prepare_frame; read by frame_views.
PREMULTIPLIED = "facegate: premultiplied alpha"
# PIL raw modes of associated alpha, decoded instead as stored (no un-premultiplying).
# (PIL keeps mode La as stored: its raw mode stays.)
_AS_STORED = {"RGBa": "RGBA", "RGBa;16L": "RGBA;16L", "RGBa;16B": "RGBA;16B", "La": "La"}


def prepare_frame(img: Image.Image) -> None:
    img.info.pop(PREMULTIPLIED, None)
    tile = getattr(img, "tile", None)  # an ImageFile's, before it decodes
    if not tile:
        return
    if img.format == "PNG":
        _png_transparency(img, _rawmode(tile[0].args))
    elif img.format == "TIFF":
        _tiff_alpha(img, tile)
    elif img.format == "BMP" and "icc_profile" not in img.info:
        fp = getattr(img, "fp", None)
        profile = embedded_profile(fp.getvalue()) if isinstance(fp, io.BytesIO) else None
        if profile is not None:
            img.info["icc_profile"] = profile


def _rawmode(args: object) -> str | None:
    rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) else None)
    return rawmode if isinstance(rawmode, str) else None


def _png_transparency(img: Image.Image, rawmode: str | None) -> None:
    """PIL scales the samples of a 2- or 4-bit grey PNG to 8 bits but leaves the
    transparent grey level as written, so no pixel matches it: scaled here. A 16-bit
    colour PNG is decoded to 8 bits a channel, where its 16-bit transparent colour would
    match the wrong pixels: dropped (16-bit grey keeps its samples: see frame_views)."""
    transparent = img.info.get("transparency")
    if transparent is None or rawmode is None:
        return
    bits = {"L;2": 2, "L;4": 4}.get(rawmode)
    if bits is not None and isinstance(transparent, int):
        levels = (1 << bits) - 1
        # The PNG specification: only the low `bits` bits of the tRNS sample count.
        img.info["transparency"] = (transparent & levels) * (255 // levels)
    elif rawmode.startswith("RGB;16") and img.mode == "RGB":
        del img.info["transparency"]  # 16-bit values: compared with 8-bit pixels, wrongly


def _tiff_alpha(img: Image.Image, tile: list[Any]) -> None:
    stored = [_AS_STORED.get(_rawmode(entry.args) or "") for entry in tile]
    if not all(stored):
        return
    # The raw samples, as stored, rather than PIL's un-premultiplied ones.
    img.tile = [  # type: ignore[attr-defined]
        entry._replace(args=(mode, *entry.args[1:]))
        for entry, mode in zip(tile, stored, strict=True)
    ]
    img.info[PREMULTIPLIED] = True


def premultiplied(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(colour as stored, alpha) of a frame prepare_frame decoded as stored."""
    stored = np.asarray(img, dtype=np.uint8)
    if img.mode in ("LA", "La"):
        return np.ascontiguousarray(np.repeat(stored[..., :1], 3, axis=2)), stored[..., 1]
    return np.ascontiguousarray(stored[..., :3]), np.ascontiguousarray(stored[..., 3])


def straight_colour(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiplied colour un-premultiplied (C * 255 / a), where alpha is not 0; where it
    is, the stored colour, which no composite shows."""
    weight = alpha.astype(np.float64)[..., None]
    straight = np.where(weight > 0, colour * 255.0 / np.maximum(weight, 1.0), colour)
    return np.clip(np.round(straight), 0, 255).astype(np.uint8)


def over(colour: np.ndarray, alpha: np.ndarray, background: int) -> np.ndarray:
    """Premultiplied colour over a grey background: C + (1 - a) * background."""
    out = colour.astype(np.int32) + ((255 - alpha.astype(np.int32)) * background // 255)[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def scaled_views(img: Image.Image) -> tuple[Image.Image, np.ndarray, list[tuple[str, Image.Image]]]:
    """A 16-bit, 32-bit or float frame as 8-bit grey, scaled over its finite samples (a NaN
    or infinity would make every pixel NaN), its samples, and, for float samples outside
    0..1, the frame as viewers that clamp floats to 0..1 show it (one far outlier would
    otherwise crush the rest to black)."""
    samples = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(samples)
    values = samples[finite]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    clean = np.where(finite, samples, low)
    scaled = (clean - low) * (255.0 / (high - low)) if high > low else np.zeros_like(clean)
    others: list[tuple[str, Image.Image]] = []
    if img.mode == "F" and (low < 0.0 or high > 1.0 or not finite.all()):
        clamped = np.clip(np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        others.append(("float samples clamped to 0..1", _grey(clamped * 255.0)))
    return _grey(scaled), samples, others


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(values).astype(np.uint8), mode="L")


def padded_palette_view(img: Image.Image) -> np.ndarray | None:
    """A PNG whose indices run past its PLTE, as Skia shows it (the missing entries take
    the table's last colour; PIL and libpng show black). None when none do."""
    if img.format != "PNG" or img.mode != "P" or img.palette is None:
        return None
    table = np.frombuffer(bytes(img.palette.palette), np.uint8)
    if img.palette.mode != "RGB" or len(table) < 3:
        return None
    entries = len(table) // 3
    indices = np.asarray(img, dtype=np.uint8)
    if int(indices.max()) < entries:
        return None
    colours = table[: entries * 3].reshape(entries, 3)
    padded = np.vstack([colours, np.repeat(colours[-1:], 256 - entries, axis=0)])
    return np.ascontiguousarray(padded[indices])
