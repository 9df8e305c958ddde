"""How far an image file found by a signature scan (`filter.content_scan.scan`) can reach,
by its own structure, so that a decoder is handed that much of the payload and not all of
the rest: PIL reads a GIF's or JPEG's unknown bytes one at a time."""

from __future__ import annotations

import re

# A JPEG marker in entropy-coded data: 0xFF not followed by a stuffed zero, RSTn or fill.
_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def span(payload: bytes, offset: int) -> int:
    """Where the image a GIF or JPEG hit starts can end by its own structure: at its
    trailer or EOI, or where that structure breaks (the walk of what is cut then says the
    image is truncated, as the walk of the rest would say it is malformed). Other formats
    are handed the rest of the payload: their decoders seek, and stop at what they need."""
    if payload.startswith(b"GIF8", offset):
        return _gif_span(payload, offset)
    if payload.startswith(b"\xff\xd8", offset):
        return _jpeg_span(payload, offset)
    return len(payload)


def _gif_span(payload: bytes, offset: int) -> int:
    if offset + 13 > len(payload):
        return len(payload)
    flags = payload[offset + 10]
    pos = offset + 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(payload):
        block = payload[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x2C and pos + 10 <= len(payload):
            local = payload[pos + 9]
            pos += 11 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
        elif block == 0x21:
            pos += 2
        else:
            return pos
        while pos < len(payload) and payload[pos]:  # sub-blocks
            pos += 1 + payload[pos]
        pos += 1
    return len(payload)


def _jpeg_span(payload: bytes, offset: int) -> int:
    pos = offset + 2
    while pos + 1 < len(payload):
        marker = payload[pos + 1]
        if payload[pos] != 0xFF:
            return pos
        if marker == 0xD9:
            return pos + 2
        if marker in (0xFF, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xE2 and payload.startswith(b"MPF\x00", pos + 4):
            return len(payload)  # an MPO: its index points past its first EOI
        pos += 2 + int.from_bytes(payload[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            found = _MARKER.search(payload, pos)
            pos = found.start() if found else len(payload)
    return len(payload)
