"""TIFF and PNM layouts that PIL decodes other than libtiff (and the viewers built on it)
or OpenCV show (filter/container_tiff.py `_decoded_otherwise`, filter/containers.py
`walk_pnm`): each is unchecked_content; the same image laid out as PIL reads it right
stays complete. Each probe was checked against libtiff's RGBA reader: its face was found
there and in none of PIL's views."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from filter.content import read_content

SHORT, LONG = 3, 4


def _tiff(width: int, height: int, tags: dict[int, tuple[int, list[int]]], data: bytes) -> bytes:
    """A little-endian TIFF written tag by tag. Tags 273 and 324 (strip and tile offsets)
    are given relative to the image data, which follows the IFD and its values."""
    tags = {256: (SHORT, [width]), 257: (SHORT, [height]), **tags}
    count = len(tags)
    values_at = 8 + 2 + 12 * count + 4
    extra = bytearray()
    for _tag, (kind, values) in sorted(tags.items()):
        size = (2 if kind == SHORT else 4) * len(values)
        if size > 4:
            extra += bytes(size + (size & 1))
    data_at = values_at + len(extra)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", count))
    extra = bytearray()
    for tag, (kind, values) in sorted(tags.items()):
        if tag in (273, 324):
            values = [data_at + value for value in values]
        packed = struct.pack("<" + ("H" if kind == SHORT else "I") * len(values), *values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", values_at + len(extra))
            extra += packed + bytes(len(packed) & 1)
        out += struct.pack("<HHI", tag, kind, len(values)) + field
    return bytes(out + bytes(4) + extra + data)


def _grey16(samples: np.ndarray, **tags: tuple[int, list[int]]) -> bytes:
    raw = samples.astype("<u2").tobytes()
    height = samples.shape[0]
    base = {258: (SHORT, [16]), 259: (SHORT, [1]), 262: (SHORT, [1]), 273: (LONG, [0]),
            277: (SHORT, [1]), 278: (SHORT, [height]), 279: (LONG, [len(raw)])}  # fmt: skip
    base.update({int(k[1:]): v for k, v in tags.items()})
    return _tiff(samples.shape[1], samples.shape[0], base, raw)


GREY = np.tile(np.arange(16, dtype=np.uint16) * 4000, (16, 1))


def _unchecked(data: bytes, phrase: str) -> None:
    content = read_content(data)
    assert not content.complete
    assert any(phrase in reason for reason in content.unaccounted), content.unaccounted


def test_the_probe_writer_makes_tiffs_pil_reads() -> None:
    content = read_content(_grey16(GREY))
    assert content.complete, content.unaccounted
    assert content.views[0].pixels[0, -1, 0] > content.views[0].pixels[0, 0, 0]


def test_white_is_zero_over_8_bits_is_unchecked() -> None:
    """PIL inverts WhiteIsZero at 1 to 8 bits but not at 16: it checked a negative."""
    _unchecked(_grey16(GREY, t262=(SHORT, [0])), "WhiteIsZero samples of over 8 bits")


def test_signed_samples_over_8_bits_are_unchecked() -> None:
    """libtiff's RGBA reader ignores the sign; PIL wraps the bright half to dark."""
    _unchecked(_grey16(GREY, t339=(SHORT, [2])), "signed samples of over 8 bits")


def test_an_image_with_both_strips_and_tiles_is_unchecked() -> None:
    """PIL decodes the strips (a decoy), libtiff the tiles (the face)."""
    raw = GREY.astype("<u2").tobytes()
    data = _grey16(GREY, t322=(SHORT, [16]), t323=(SHORT, [16]), t324=(LONG, [0]),
                   t325=(LONG, [len(raw)]))  # fmt: skip
    _unchecked(data, "both strips and tiles")


def _planar(bits: int, fill_order: int) -> bytes:
    planes = np.stack([GREY >> 8] * 3).astype(np.uint8 if bits == 8 else "<u2")
    raw = planes.tobytes()
    plane = len(raw) // 3
    return _tiff(16, 16, {
        258: (SHORT, [bits] * 3), 259: (SHORT, [1]), 262: (SHORT, [2]), 266: (SHORT, [fill_order]),
        273: (LONG, [0, plane, 2 * plane]), 277: (SHORT, [3]), 278: (SHORT, [16]),
        279: (LONG, [plane] * 3), 284: (SHORT, [2]),
    }, raw)  # fmt: skip


def test_uncompressed_planes_pil_misreads_are_unchecked() -> None:
    assert read_content(_planar(8, 1)).complete  # 8-bit planes: PIL reads them right
    _unchecked(_planar(16, 1), "uncompressed planes")
    _unchecked(_planar(8, 2), "uncompressed planes")


def _paletted(colour_map: list[int]) -> bytes:
    indices = (np.arange(256, dtype=np.uint8).reshape(16, 16)).tobytes()
    return _tiff(16, 16, {
        258: (SHORT, [8]), 259: (SHORT, [1]), 262: (SHORT, [3]), 273: (LONG, [0]),
        277: (SHORT, [1]), 278: (SHORT, [16]), 279: (LONG, [256]), 320: (SHORT, colour_map),
    }, indices)  # fmt: skip


def test_a_colour_map_of_8_bit_values_is_unchecked() -> None:
    """Old writers store 0..255; libtiff and libvips then take the map as 8-bit, PIL
    divides it by 256: a black view."""
    ramp = list(range(256))
    _unchecked(_paletted(ramp * 3), "ColorMap of 8-bit values")
    assert read_content(_paletted([v * 257 for v in ramp] * 3)).complete


def test_a_jpeg_compressed_tiff_is_not_rejected_for_its_shared_tables() -> None:
    """Its JPEGTables tag (a tables-only JPEG stream) was scanned as an embedded image that
    cannot be decoded: every JPEG-compressed TIFF was unchecked_content."""
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([GREY >> 8] * 3).astype(np.uint8)).save(
        buffer, "TIFF", compression="jpeg"
    )
    content = read_content(buffer.getvalue())
    assert content.complete, content.unaccounted


@pytest.mark.parametrize(("magic", "channels"), [(b"P5", 1), (b"P6", 3)])
def test_pnm_samples_above_maxval_are_unchecked(magic: bytes, channels: int) -> None:
    """PIL clamps them to maxval (a blank sheet); readers that take the raster as it is
    show what they hold."""
    raster = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, channels))
    header = magic + b"\n16 16\n%d\n"
    assert read_content(header % 255 + raster.tobytes()).complete
    content = read_content(header % 15 + raster.tobytes())
    assert any("above its maxval (15)" in reason for reason in content.unaccounted)
