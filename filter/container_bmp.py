"""BMP: its headers, palette, pixel array and ICC profile, and what viewers show of it
that PIL does not decode.

Every byte is accounted for as before: the headers, the palette and masks (scanned for
embedded images), the pixel array, a V5 header's ICC profile after the pixels; what
follows them is unaccounted. Unaccounted as well, since a browser shows what PIL does not
(each reproduced with the file built byte by byte, tests/unit/test_container_bmp.py):

- a palette PIL takes for black and white or greyscale while the pixels have another
  depth: PIL then reads 4- or 8-bit rows as 1-bit (or 4-bit rows as 8-bit), and the
  picture is lost;
- run-length encoding that skips pixels (a delta, or a line or the bitmap ended early):
  browsers leave them transparent, PIL paints them with index 0;
- an alpha mask (a V3 or later header's, or BI_ALPHABITFIELDS') that PIL does not
  decode: Chromium and Firefox show it as transparency;
- a colour space other than sRGB that a viewer applies (calibrated endpoints or gamma, a
  linked profile). An embedded profile is read instead (`embedded_profile`), as PNG's and
  JPEG's are, and its managed view is checked.
"""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image

from filter.content_scan import Layout, scan

_BI_RLE8, _BI_RLE4, _BI_BITFIELDS, _BI_ALPHABITFIELDS = 1, 2, 3, 6
_SRGB, _WINDOWS = 0x73524742, 0x57696E20  # 'sRGB', 'Win ': the display's own colours
_CALIBRATED, _EMBEDDED = 0, 0x4D424544  # 'MBED'


def walk_bmp(data: bytes, layout: Layout) -> None:
    if len(data) < 30:
        layout.unread("the BMP header is truncated")
        return
    offset, header = struct.unpack_from("<II", data, 10)
    end = offset
    if header >= 40 and len(data) >= 14 + 40:
        width, height, _planes, bits, compression, image_size = struct.unpack_from(
            "<iiHHII", data, 18
        )
        stride = (abs(width) * bits + 31) // 32 * 4
        end = offset + (image_size if compression not in (0, 3, 6) else stride * abs(height))
        if header >= 124 and len(data) >= 14 + 120:  # V5: an ICC profile after the pixels
            profile, profile_size = struct.unpack_from("<II", data, 14 + 112)
            if profile and profile_size:
                start = 14 + profile
                scan(data[start : start + profile_size], "the BMP's ICC profile", layout)
                end = max(end, start + profile_size)
        _shown_otherwise(data, header, (width, height, bits, compression), layout)
    else:  # BITMAPCOREHEADER
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        end = offset + (width * bits + 31) // 32 * 4 * height
    scan(data[14 + header : offset], "the BMP palette and masks", layout)
    layout.end = end


def _shown_otherwise(
    data: bytes, header: int, geometry: tuple[int, int, int, int], layout: Layout
) -> None:
    width, height, bits, compression = geometry
    try:
        with warnings.catch_warnings():  # a large image is the pixel limit's to refuse
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # the header only: what PIL decodes
                mode = img.mode
    except Exception:  # undecodable, or too large: content.py rejects it on its own
        return
    if bits in (4, 8) and mode in ("1", "L") and (mode == "1" or bits != 8):
        layout.unread(
            f"a {bits}-bit BMP whose palette PIL takes for {'1-bit' if mode == '1' else '8-bit'}"
            " grey, decoding its rows at the wrong depth (viewers show the palette's colours)"
        )
    if compression in (_BI_RLE8, _BI_RLE4):
        skipped = _rle_skips(data, width, abs(height), compression == _BI_RLE4)
        if skipped:
            layout.unread(
                f"a run-length encoded BMP that {skipped}: browsers leave those pixels "
                "transparent, PIL paints them with the first palette colour"
            )
    alpha = _alpha_mask(data, header, compression)
    if alpha and bits >= 16 and "A" not in mode:
        layout.unread(
            f"a BMP alpha mask ({alpha:#x}) that PIL does not decode: browsers show it as "
            "transparency"
        )
    if header >= 108 and len(data) >= 14 + 108:
        space = struct.unpack_from("<I", data, 14 + 56)[0]
        calibration = data[14 + 60 : 14 + 108]
        if space not in (_SRGB, _WINDOWS, _EMBEDDED) and (
            space != _CALIBRATED or calibration.strip(b"\x00")
        ):
            layout.unread(
                f"a BMP colour space ({_space_name(space)}) that viewers apply and facegate "
                "does not"
            )


def _alpha_mask(data: bytes, header: int, compression: int) -> int:
    """The alpha mask browsers use: a V3 or later header's, or the fourth mask after a
    40-byte header with BI_ALPHABITFIELDS (0: none)."""
    if header >= 56 and len(data) >= 14 + 56:
        return int(struct.unpack_from("<I", data, 14 + 52)[0])
    if header == 40 and compression == _BI_ALPHABITFIELDS and len(data) >= 14 + 56:
        return int(struct.unpack_from("<I", data, 14 + 40 + 12)[0])
    return 0


def _space_name(space: int) -> str:
    text = space.to_bytes(4, "big")
    return repr(text.decode("latin-1")) if text.isalnum() else f"type {space}"


def _rle_skips(data: bytes, width: int, height: int, four_bit: bool) -> str | None:
    """How an RLE pixel stream leaves pixels unset (None: it sets every one)."""
    offset = struct.unpack_from("<I", data, 10)[0]
    pos, x, y = offset, 0, 0
    while pos + 1 < len(data) and y < height:
        count, value = data[pos], data[pos + 1]
        pos += 2
        if count:
            x += count
        elif value == 0:  # end of line
            if x < width:
                return f"ends line {y + 1} after {x} of {width} pixels"
            x, y = 0, y + 1
        elif value == 1:  # end of bitmap
            break
        elif value == 2:  # delta
            return "moves past pixels with a delta"
        else:  # an absolute run of `value` pixels, padded to 16 bits
            size = (value + 1) // 2 if four_bit else value
            pos += size + (size & 1)
            x += value
    if y < height - (1 if x >= width else 0):
        return f"ends after {y} of {height} lines"
    return None


def embedded_profile(data: bytes) -> bytes | None:
    """A V5 header's embedded ICC profile (PROFILE_EMBEDDED), which PIL does not read:
    viewers apply it as they apply a PNG's or a JPEG's."""
    if len(data) < 14 + 124 or data[:2] != b"BM":
        return None
    header = struct.unpack_from("<I", data, 14)[0]
    if header < 124 or struct.unpack_from("<I", data, 14 + 56)[0] != _EMBEDDED:
        return None
    start, size = struct.unpack_from("<II", data, 14 + 112)
    profile = data[14 + start : 14 + start + size]
    return profile if size and len(profile) == size else None
