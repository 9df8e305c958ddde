"""The structure of each image format the content rule accounts for: every chunk,
segment or block is either image data (decoded as a frame or a thumbnail), metadata of a
known kind (scanned for embedded images where it is free-form), or unaccounted.

- PNG, APNG (filter.container_png): every chunk of the PNG specification and APNG at its
  specified size, and a few small fixed private chunks; text, ICC, EXIF, C2PA (caBX),
  sPLT and pCAL are scanned; each frame's image data must inflate to exactly its rows.
  Unaccounted: other chunks, colour or transparency chunks after the image data, frames
  beyond acTL's count, bytes after a compressed stream or after IEND, frames PIL
  composes other than browsers (filter.container_apng).
- JPEG, MPO: markers and entropy-coded data; APP0 JFIF/JFXX (thumbnails), APP1 EXIF and
  XMP, APP2 ICC and MPF (the MPO's other images), APP11 JUMBF (C2PA), APP12, APP13
  Photoshop, APP14 Adobe, COM. Unaccounted: other APP segments (FlashPix, ...), unknown
  markers, bytes after EOI that no MPF entry claims.
- GIF: image blocks; comment, plain-text, NETSCAPE/ANIMEXTS, XMP and ICC application
  blocks are scanned (filter.container_gif). Unaccounted: other extensions, bytes after
  the trailer, frames without a colour table or with more than one Graphic Control
  Extension, frames PIL composes other than browsers.
- WebP: VP8, VP8L, VP8X, ALPH, ANIM, ANMF; ICCP and XMP scanned, EXIF walked.
  Unaccounted: other chunks, bytes after the RIFF size.
- TIFF: IFDs, strips, tiles, SubIFDs (decoded), EXIF and GPS IFDs, Photoshop resources.
  Unaccounted: Photoshop layers (tag 37724), bytes after the last structure, layouts PIL
  decodes other than libtiff shows.
- BMP (filter.container_bmp): headers, palette, pixel array, ICC profile. Unaccounted:
  bytes after them, BMPs PIL decodes other than browsers show.
- PBM/PGM/PPM (binary): header and raster. Unaccounted: a second image, any byte after,
  samples above maxval.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from filter.container_bmp import walk_bmp
from filter.container_gif import walk_gif
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
        maxval = fields[2]
        size = width * height * channels * (2 if maxval > 255 else 1)
        raster = np.frombuffer(data[pos : pos + size], ">u2" if maxval > 255 else np.uint8)
        if raster.size and int(raster.max()) > maxval:
            # PIL clamps such samples to maxval (a blank sheet); readers that take the
            # raster as it is show them.
            layout.unread(f"PNM samples above its maxval ({maxval}), which readers show apart")
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
