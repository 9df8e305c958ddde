"""Probe files that show a viewer a face the raw pixels hide: a face drawn in the alpha
channel alone, a face stored in a narrow band of values that a colour profile (ICC, or
PNG gAMA / cHRM) stretches to the full range. Each is a stranger beside the hidden face."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# The band a stretching profile maps to the full range.
BAND = (120, 136)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + right.shape[1], *left.shape[2:]), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] :] = right
    return canvas


def alpha_drawn(shown: np.ndarray, hidden: np.ndarray) -> bytes:
    """A PNG: `shown` opaque on the left; on the right white pixels whose opacity is the
    hidden face's brightness (blank over white, the face over a dark page)."""
    grey = np.asarray(Image.fromarray(hidden).convert("L"))
    rgba_left = np.dstack([shown, np.full(shown.shape[:2], 255, np.uint8)])
    rgba_right = np.dstack([np.full((*grey.shape, 3), 255, np.uint8), grey])
    buffer = io.BytesIO()
    Image.fromarray(side_by_side(rgba_left, rgba_right), "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def in_band(pixels: np.ndarray) -> np.ndarray:
    low, high = BAND
    return np.round(low + pixels.astype(np.float64) * (high - low) / 255.0).astype(np.uint8)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def stretching_icc_profile(grey: bool = False) -> bytes:
    """An RGB display profile (sRGB's primaries, D50) whose tone curves map BAND to the full
    range: what is stored in the band, a viewer shows at full contrast (`grey`: the same as
    a greyscale profile, one curve)."""
    low, high = BAND
    values = np.clip((np.arange(256) - low) / (high - low), 0.0, 1.0)
    linear = np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)
    curve = b"curv" + bytes(4) + struct.pack(">I", 256)
    curve += np.round(linear * 65535).astype(">u2").tobytes()
    description = b"desc" + bytes(4) + struct.pack(">I", 8) + b"stretch\0" + bytes(79)
    colour = [
        (b"rXYZ", _xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", _xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", _xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    tags = [
        (b"desc", description),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        *([(b"kTRC", curve)] if grey else colour),
        (b"cprt", b"text" + bytes(4) + b"none\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    directory, body = b"", b""
    for signature, data in tags:
        body += bytes(-(offset + len(body)) % 4)
        directory += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    profile = bytearray(128) + struct.pack(">I", len(tags)) + directory + body
    struct.pack_into(">I", profile, 0, len(profile))
    profile[8:12] = b"\x02\x10\x00\x00"  # version 2.1
    profile[12:24] = b"mntrGRAYXYZ " if grey else b"mntrRGB XYZ "
    profile[36:40] = b"acsp"
    profile[68:80] = _s15(0.9642) + _s15(1.0) + _s15(0.8249)  # D50
    return bytes(profile)


def icc_stretched(shown: np.ndarray, hidden: np.ndarray, fmt: str = "PNG") -> bytes:
    """`shown` at full contrast beside `hidden` squeezed into BAND, with the stretching
    profile: the raw pixels show a stranger and a grey panel, a viewer both faces."""
    buffer = io.BytesIO()
    image = Image.fromarray(side_by_side(shown, in_band(hidden)), "RGB")
    # JPEG at its finest: its rounding is stretched too, and the face must stay one a
    # viewer (and the embedder) could tell.
    options = {"quality": 98, "subsampling": 0} if fmt == "JPEG" else {}
    image.save(buffer, fmt, icc_profile=stretching_icc_profile(), **options)
    return buffer.getvalue()


def png_with_chunks_before_idat(png: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """The PNG with these (type, body) chunks inserted right after IHDR."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    inserted = b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )
    return png[:ihdr_end] + inserted + png[ihdr_end:]


def dark_with_gamma(shown: np.ndarray, hidden: np.ndarray, gamma: float = 1.5) -> bytes:
    """`shown` beside `hidden` stored as what a file gamma of `gamma` means (samples =
    linear ** gamma: dark), with the gAMA chunk that tells a viewer so."""
    linear = (hidden.astype(np.float64) / 255.0) ** 2.2
    stored = np.round(255.0 * linear**gamma).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(side_by_side(shown, stored), "RGB").save(buffer, "PNG")
    return png_with_chunks_before_idat(
        buffer.getvalue(), (b"gAMA", struct.pack(">I", round(gamma * 100000)))
    )


def raw_png(
    samples: np.ndarray, bits: int, transparent: tuple[int, ...] = (), palette: bytes = b""
) -> bytes:
    """A PNG written sample by sample (PIL writes no 2- or 4-bit grey, no tRNS colour in
    16 bits, no PLTE shorter than its indices): `samples` is HxW (grey, or palette indices
    when `palette` is given) or HxWx3 (colour) at `bits` per sample; the tRNS chunk makes
    `transparent` (one value per channel) the transparent colour."""
    colour = samples.ndim == 3
    height, width = samples.shape[:2]
    if bits == 16:
        rows = [samples[y].astype(">u2").tobytes() for y in range(height)]
    elif bits == 8:
        rows = [samples[y].astype(np.uint8).tobytes() for y in range(height)]
    else:
        per_byte = 8 // bits
        rows = []
        for y in range(height):
            packed = bytearray((width + per_byte - 1) // per_byte)
            for x, value in enumerate(samples[y]):
                packed[x // per_byte] |= int(value) << (8 - bits * (x % per_byte + 1))
            rows.append(bytes(packed))
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    colour_type = 2 if colour else (3 if palette else 0)
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    trns = struct.pack(f">{len(transparent)}H", *transparent)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + (chunk(b"PLTE", palette) if palette else b"")
        + (chunk(b"tRNS", trns) if transparent else b"")
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
