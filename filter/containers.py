"""The structure of each image format the content rule accounts for: every chunk,
segment or block is either image data (decoded as a frame or a thumbnail), metadata of a
known kind (scanned for embedded images where it is free-form), or unaccounted.

- PNG, APNG (filter.container_png): every chunk of the PNG specification and APNG at its
  specified size, and a few small fixed private chunks; text, ICC, EXIF, C2PA (caBX),
  sPLT and pCAL are scanned; each frame's image data must inflate to exactly its rows.
  Unaccounted: other chunks, frames beyond acTL's count, bytes after a compressed stream
  or after IEND.
- JPEG, MPO: markers and entropy-coded data; APP0 JFIF/JFXX (thumbnails), APP1 EXIF and
  XMP, APP2 ICC and MPF (the MPO's other images), APP11 JUMBF (C2PA), APP12, APP13
  Photoshop, APP14 Adobe, COM. Unaccounted: other APP segments (FlashPix, ...), unknown
  markers, bytes after EOI that no MPF entry claims.
- GIF: image blocks; comment, plain-text, NETSCAPE/ANIMEXTS, XMP and ICC application
  blocks are scanned. Unaccounted: other extensions, bytes after the trailer.
- WebP: VP8, VP8L, VP8X, ALPH, ANIM, ANMF; ICCP and XMP scanned, EXIF walked.
  Unaccounted: other chunks, bytes after the RIFF size.
- TIFF: IFDs, strips, tiles, SubIFDs (decoded), EXIF and GPS IFDs, Photoshop resources.
  Unaccounted: Photoshop layers (tag 37724), bytes after the last structure.
- BMP: headers, palette, pixel array, ICC profile. Unaccounted: bytes after them.
- PBM/PGM/PPM (binary): header and raster. Unaccounted: a second image, any byte after.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from filter.container_jpeg import EXIF_HEADERS, walk_jpeg
from filter.container_png import walk_png
from filter.container_tiff import walk_tiff
from filter.content_scan import Layout, scan


def walk(image_format: str, data: bytes, layout: Layout) -> bool:
    """Walk `data` as `image_format` (PIL's name); False if the format is not one the rule
    accounts for."""
    walker = _WALKERS.get(image_format)
    if walker is None:
        return False
    walker(data, layout)
    return True


def _name(kind: bytes) -> str:
    return repr(kind.decode("latin-1"))


_GIF_APPLICATIONS = {b"NETSCAPE2.0", b"ANIMEXTS1.0", b"XMP DataXMP", b"ICCRGBG1012"}


def walk_gif(data: bytes, layout: Layout) -> None:
    if len(data) < 13:
        layout.unread("the GIF header is truncated")
        return
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            layout.end = pos + 1
            return
        if block == 0x2C:  # an image: descriptor, local colour table, LZW data
            if pos + 10 > len(data):
                break
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            pos, _ = _sub_blocks(data, pos)
        elif block == 0x21 and pos + 1 < len(data):
            label = data[pos + 1]
            pos, payload = _sub_blocks(data, pos + 2)
            if label == 0xF9:
                continue
            if label in (0xFE, 0x01):
                scan(payload, "a GIF comment" if label == 0xFE else "a GIF text block", layout)
            elif label == 0xFF and payload[:11] in _GIF_APPLICATIONS:
                scan(payload[11:], f"the GIF {payload[:8].decode('latin-1')} block", layout)
            else:
                layout.unread(f"a GIF extension {label:#04x} that facegate does not read")
        else:
            layout.unread(f"an unknown GIF block {block:#04x} at byte {pos}")
            return
    layout.unread("the GIF ends without its trailer")


def _sub_blocks(data: bytes, pos: int) -> tuple[int, bytes]:
    out = bytearray()
    while pos < len(data):
        size = data[pos]
        if size == 0:
            return pos + 1, bytes(out)
        out.extend(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return pos, bytes(out)


_WEBP_IMAGE = {b"VP8 ", b"VP8L", b"ALPH"}
_WEBP_FIXED = {b"VP8X", b"ANIM"}


def walk_webp(data: bytes, layout: Layout) -> None:
    (size,) = struct.unpack_from("<I", data, 4)
    end = 8 + size
    _riff_chunks(data[12:end], layout, frame=False)
    layout.end = end


def _riff_chunks(data: bytes, layout: Layout, frame: bool) -> None:
    pos = 0
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            layout.unread(f"the WebP chunk {_name(kind)} is truncated")
            return
        pos += 8 + length + (length & 1)
        if kind in _WEBP_IMAGE or (kind in _WEBP_FIXED and not frame):
            continue
        if kind == b"ANMF" and not frame:
            _riff_chunks(body[16:], layout, frame=True)
        elif kind == b"EXIF" and not frame:
            walk_tiff(body[6:] if body[:6] in EXIF_HEADERS else body, "EXIF", layout, file=False)
        elif kind in (b"ICCP", b"XMP ") and not frame:
            scan(body, f"the WebP {_name(kind)} chunk", layout)
        else:
            layout.unread(f"a WebP chunk {_name(kind)} that facegate does not read")
    if data[pos:].strip(b"\x00"):
        layout.unread("the WebP chunks are truncated")


def walk_tiff_file(data: bytes, layout: Layout) -> None:
    walk_tiff(data, "TIFF", layout, file=True)


def walk_bmp(data: bytes, layout: Layout) -> None:
    if len(data) < 30:
        layout.unread("the BMP header is truncated")
        return
    offset, header = struct.unpack_from("<II", data, 10)
    end = offset
    if header >= 40:
        width, height, _planes, bits, compression, image_size = struct.unpack_from(
            "<iiHHII", data, 18
        )
        stride = (abs(width) * bits + 31) // 32 * 4
        end = offset + (image_size if compression not in (0, 3, 6) else stride * abs(height))
        if header >= 124:  # BITMAPV5HEADER: an embedded ICC profile, after the pixels
            profile, profile_size = struct.unpack_from("<II", data, 14 + 112)
            if profile and profile_size:
                start = 14 + profile
                scan(data[start : start + profile_size], "the BMP's ICC profile", layout)
                end = max(end, start + profile_size)
    else:  # BITMAPCOREHEADER
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        end = offset + (width * bits + 31) // 32 * 4 * height
    scan(data[14 + header : offset], "the BMP palette and masks", layout)
    layout.end = end


def walk_pnm(data: bytes, layout: Layout) -> None:
    fields: list[int] = []
    pos = 2
    wanted = 2 if data[:2] in (b"P1", b"P4") else 3
    while len(fields) < wanted:
        while pos < len(data) and (data[pos : pos + 1].isspace() or data[pos] == ord("#")):
            if data[pos] == ord("#"):
                pos = data.find(b"\n", pos)
                if pos < 0:
                    pos = len(data)
            pos += 1
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            layout.unread("the PNM header is malformed")
            return
        fields.append(int(data[start:pos]))
    pos += 1
    width, height = fields[0], fields[1]
    if data[:2] in (b"P4",):
        size = (width + 7) // 8 * height
    elif data[:2] in (b"P5", b"P6"):
        channels = 3 if data[:2] == b"P6" else 1
        size = width * height * channels * (2 if fields[2] > 255 else 1)
    else:
        layout.unread("a plain-text PNM, which facegate does not account for")
        return
    layout.end = pos + size


_WALKERS: dict[str, Callable[[bytes, Layout], None]] = {
    "PNG": walk_png,
    "JPEG": walk_jpeg,
    "MPO": walk_jpeg,
    "GIF": walk_gif,
    "WEBP": walk_webp,
    "TIFF": walk_tiff_file,
    "BMP": walk_bmp,
    "PPM": walk_pnm,
}
