"""What a browser shows of a BMP that PIL does not decode (filter/container_bmp.py): each
such file is unaccounted (rejected as unchecked_content), or, for an embedded profile,
checked as managed; BMPs PIL decodes as viewers do stay complete."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from filter.content import read_content
from tests.colour_probes import stretching_icc_profile

SRGB, CALIBRATED, EMBEDDED = b"BGRs", b"\x00\x00\x00\x00", b"DEBM"  # little-endian types


def _bmp(
    width: int,
    height: int,
    bits: int,
    pixels: bytes,
    *,
    header: int = 40,
    compression: int = 0,
    masks: tuple[int, int, int, int] = (0, 0, 0, 0),
    palette: bytes = b"",
    space: bytes = SRGB,
    calibration: bytes = bytes(48),
    profile: bytes = b"",
) -> bytes:
    """A BMP built field by field (PIL writes only 40-byte headers): `pixels` are the
    rows bottom-up, padded, or the RLE stream."""
    info = struct.pack(
        "<IiiHHIIiiII", header, width, height, 1, bits, compression, len(pixels), 2835, 2835,
        len(palette) // 4, 0,
    )  # fmt: skip
    if header >= 56:
        info += struct.pack("<IIII", *masks)
    if header >= 108:
        info += space + calibration
    if header >= 124:
        at = header + len(palette) + len(pixels)  # after the pixels, from the info header
        info += struct.pack("<IIII", 4, at if profile else 0, len(profile), 0)
    body = info + palette + pixels + profile
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, offset) + body


def _rows(indices: np.ndarray) -> bytes:
    stride = (indices.shape[1] + 3) // 4 * 4
    padded = np.zeros((indices.shape[0], stride), np.uint8)
    padded[:, : indices.shape[1]] = indices
    return padded[::-1].tobytes()


FACE = np.zeros((16, 16), np.uint8)
FACE[4:12, 4:12] = 1
BLACK_WHITE = bytes([0, 0, 0, 0, 255, 255, 255, 0])


def _unaccounted(data: bytes, phrase: str) -> None:
    content = read_content(data)
    assert not content.complete, content.views
    assert any(phrase in reason for reason in content.unaccounted), content.unaccounted


def test_an_8_bit_bmp_with_a_black_and_white_palette_is_unaccounted() -> None:
    """PIL takes the palette for 1-bit and reads the 8-bit rows as 1-bit: the face is
    gone from every view, while viewers show it white on black."""
    data = _bmp(16, 16, 8, _rows(FACE), palette=BLACK_WHITE)
    _unaccounted(data, "takes for 1-bit grey")


def test_bmps_pil_writes_stay_complete() -> None:
    for mode in ("1", "L", "P", "RGB", "RGBA"):
        image = Image.fromarray(FACE * 255).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, "BMP")
        content = read_content(buffer.getvalue())
        assert content.complete, (mode, content.unaccounted)


def _rle8(lines: list[bytes]) -> bytes:
    return b"".join(lines) + b"\x00\x01"


def test_run_length_encoding_that_skips_pixels_is_unaccounted() -> None:
    """Skipped pixels are transparent in browsers, the first palette colour in PIL."""
    full_line = b"\x10\x00\x00\x00"  # 16 pixels of index 0, end of line
    palette = bytes([0, 0, 255, 0, 255, 0, 0, 0])  # red, blue: not taken for grey
    whole = _bmp(16, 4, 8, _rle8([full_line] * 4), compression=1, palette=palette)
    assert read_content(whole).complete
    delta = _bmp(16, 4, 8, _rle8([b"\x00\x02\x04\x01", *[full_line] * 3]), compression=1,
                 palette=palette)  # fmt: skip
    _unaccounted(delta, "moves past pixels with a delta")
    short = _bmp(16, 4, 8, _rle8([b"\x08\x00\x00\x00", *[full_line] * 3]), compression=1,
                 palette=palette)  # fmt: skip
    _unaccounted(short, "ends line 1 after 8 of 16 pixels")


def test_an_alpha_mask_pil_does_not_decode_is_unaccounted() -> None:
    """A V4 header's alpha mask over BI_RGB 32-bit pixels: Chromium shows it as
    transparency, PIL decodes the pixels opaque (BGRX)."""
    bgra = np.zeros((16, 16, 4), np.uint8)
    bgra[..., 3] = FACE * 255  # black colour, the face in the alpha channel
    data = _bmp(16, 16, 32, bgra[::-1].tobytes(), header=108,
                masks=(0xFF0000, 0xFF00, 0xFF, 0xFF000000))  # fmt: skip
    _unaccounted(data, "alpha mask (0xff000000) that PIL does not decode")
    opaque = _bmp(16, 16, 32, bgra[::-1].tobytes(), header=108, masks=(0xFF0000, 0xFF00, 0xFF, 0))
    assert read_content(opaque).complete


def test_a_calibrated_colour_space_is_unaccounted_and_srgb_is_not() -> None:
    pixels = np.zeros((16, 16, 3), np.uint8).tobytes()
    gamma = bytes(36) + struct.pack("<III", 1 << 16, 1 << 16, 1 << 16)
    calibrated = _bmp(16, 16, 24, pixels, header=124, space=CALIBRATED, calibration=gamma)
    _unaccounted(calibrated, "colour space (type 0) that viewers apply")
    for space, calibration in ((SRGB, gamma), (CALIBRATED, bytes(48))):
        plain = _bmp(16, 16, 24, pixels, header=124, space=space, calibration=calibration)
        assert read_content(plain).complete


def test_an_embedded_profile_is_applied_as_a_managed_view() -> None:
    """PIL does not read a V5 header's profile; viewers apply it. A profile that stretches
    a narrow band shows what the raw pixels keep at low contrast."""
    band = np.full((16, 16, 3), 120, np.uint8)
    band[4:12, 4:12] = 136
    data = _bmp(16, 16, 24, band[::-1, :, ::-1].tobytes(), header=124, space=EMBEDDED,
                profile=stretching_icc_profile())  # fmt: skip
    content = read_content(data)
    views = {view.name: view.pixels for view in content.views}
    assert "image, as its ICC profile shows it" in views, list(views)
    managed = views["image, as its ICC profile shows it"].astype(int)
    assert managed.max() - managed.min() > 200
