"""Where images hide inside image files: the part of the content rule (`filter.content`)
that every format's walker shares.

- `scan`: a free-form payload (text, comments, ICC profiles, EXIF values and MakerNotes,
  XMP, C2PA/JUMBF) searched for embedded image files, by their signatures and as base64
  text (an XMP thumbnail, a data URI in a JSON workflow);
- `Layout`, `Embedded`: what a walk records. TIFF structures and Photoshop resources are
  walked in `filter.container_tiff`, PNG in `filter.container_png`, JPEG in
  `filter.container_jpeg`.

They record what they find in a `Layout`: images to decode and check, and descriptions
of bytes nobody can check (which reject the file as `unchecked_content`).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, field
from itertools import count

from filter.scan_spans import span

# One scan's hits share a group: an image found at one offset claims the bytes up to its
# end, and hits inside it are its own business (its own walk finds them).
_groups = count(1)


@dataclass(frozen=True)
class Embedded:
    """An image inside a file, to be decoded and checked like the file's own frames."""

    name: str  # e.g. "EXIF thumbnail", "an image in the PNG tEXt chunk"
    source: bytes  # the image's bytes, or the payload it starts in at `start`
    whole_file: bool = True  # False: a page of a TIFF structure already walked: decode only
    host_after_end: bool = False  # found by a scan: the bytes after its end are the host's
    group: int = 0
    offset: int = 0  # within the scanned payload (group > 0)
    swap_red_blue: bool = False  # Photoshop's old thumbnail resource stores BGR
    start: int = 0
    stop: int | None = None

    @property
    def data(self) -> bytes:
        # A scan hit shares its payload and is cut only when it is tried: a hit inside an
        # image already read is skipped uncut.
        if self.start or self.stop is not None:
            return self.source[self.start : self.stop]
        return self.source


@dataclass
class Layout:
    """What walking a container found."""

    embedded: list[Embedded] = field(default_factory=list)
    raw: list[tuple[str, bytes, int, int]] = field(default_factory=list)  # name, RGB, w, h
    unaccounted: list[str] = field(default_factory=list)
    end: int | None = None  # where the container's structure ends (None: it broke off)
    offered: int = 0  # bytes of scan hits handed to decoders (MAX_OFFERED)

    def unread(self, what: str) -> None:
        self.unaccounted.append(what)


def trailing(data: bytes, end: int, what: str) -> str | None:
    """Bytes after the end of a container: unaccounted unless they are all zero (padding
    some writers add, which can hold nothing)."""
    rest = data[end:]
    if not rest.strip(b"\x00"):
        return None
    return f"{len(rest)} bytes after the end of the {what} image"


# Image files by their first bytes. The short ones are checked further before they count
# (`_plausible`): a JPEG needs a marker after its SOI, a BMP a consistent header, a TIFF
# an IFD that describes an image.
_SIGNATURE = re.compile(
    rb"\x89PNG\r\n\x1a\n|\xff\xd8\xff[\xc0-\xfe]|GIF8[79]a|RIFF....WEBP|II\*\x00|MM\x00\*"
    rb"|8BPS\x00\x01|\x00\x00\x00\x0cjP  \r\n\x87\n|BM",
    re.DOTALL,
)
# The same files as the start of base64 text (an image encoded alone starts a base64 group):
# PNG, JPEG, GIF, WebP (RIFF), TIFF (both orders), PSD, JPEG 2000, BMP ("BM" and the
# size's first bits).
_BASE64_IMAGE = re.compile(
    rb"(?:iVBORw0KGgo|/9j/|R0lGOD|UklGR|SUkqA|TU0AK|OEJQUw|AAAADGpQ|Qk[0-3])"
    rb"[A-Za-z0-9+/]{60,}={0,2}"
)
# Escapes inside base64 text as XML and JSON write them (character references, the five
# named entities, CDATA section markers, backslashes), then whitespace: undone in two
# passes (the same result as one) since a regular expression over every whitespace byte
# of a large payload (a JPEG's scan data) is several times slower. Tools decode all of
# them before base64 (exiftool, exiv2).
_TEXT_ESCAPES = re.compile(
    rb"&#(?:[xX]([0-9a-fA-F]{1,6})|([0-9]{1,7}));|&(amp|lt|gt|quot|apos);|<!\[CDATA\[|\]\]>|\\[nr]?"
)
_NAMED = {b"amp": b"&", b"lt": b"<", b"gt": b">", b"quot": b'"', b"apos": b"'"}
_WHITESPACE = b" \t\n\r\x0b\x0c"
# Images one payload may ask the reader to try, as many as filter.content tries in a whole
# file (MAX_EMBEDDED): a payload stuffed with signatures rejects the file either way, and
# stopping here keeps the hits themselves from costing time and memory.
MAX_HITS = 256
# Bytes the hits of one container's payloads may hand to decoders in all: PIL reads a GIF's
# or JPEG's unknown bytes one at a time, so each failing hit costs as much as it is given.
MAX_OFFERED = 64 * 1024 * 1024


def scan(payload: bytes, where: str, layout: Layout) -> None:
    """Record every image file embedded in a free-form payload (at most MAX_HITS; more
    leave the payload unaccounted)."""
    if len(payload) < 8:
        return
    group = next(_groups)
    hits = 0
    for match in _SIGNATURE.finditer(payload):
        offset = match.start()
        if not _plausible(payload, offset):
            continue
        hits += 1
        if hits > MAX_HITS:
            layout.unread(f"more than {MAX_HITS} embedded images in {where}, from byte {offset} on")
            return
        stop = span(payload, offset)
        if not _offer(layout, stop - offset, where, offset):
            return
        layout.embedded.append(
            Embedded(
                f"an image in {where}",
                payload,
                host_after_end=True,
                group=group,
                offset=offset,
                start=offset,
                stop=None if stop == len(payload) else stop,
            )
        )
    texts = [payload]
    if b"\x00" in payload:  # UTF-16 text (EXIF XP tags, a Unicode UserComment)
        texts.append(payload.replace(b"\x00", b""))
    seen: set[bytes] = set()
    for text in texts:
        for match in _BASE64_IMAGE.finditer(_unbroken(text)):
            encoded = match.group()
            try:
                decoded = base64.b64decode(encoded + b"=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                continue
            if decoded in seen or not _SIGNATURE.match(decoded) or not _plausible(decoded, 0):
                continue
            seen.add(decoded)
            hits += 1
            if hits > MAX_HITS:
                layout.unread(f"more than {MAX_HITS} embedded images in {where} (base64)")
                return
            if not _offer(layout, len(decoded), where, match.start()):
                return
            layout.embedded.append(
                Embedded(f"a base64 image in {where}", decoded, host_after_end=True)
            )


def _offer(layout: Layout, size: int, where: str, offset: int) -> bool:
    layout.offered += size
    if layout.offered <= MAX_OFFERED:
        return True
    layout.unread(
        f"embedded images in {where} from byte {offset} on, past the {MAX_OFFERED} bytes "
        "facegate decodes from one container's metadata"
    )
    return False


def _unbroken(text: bytes) -> bytes:
    return _TEXT_ESCAPES.sub(_unescaped, text).translate(None, _WHITESPACE)


def _unescaped(match: re.Match[bytes]) -> bytes:
    hexadecimal, decimal, name = match.groups()
    if hexadecimal or decimal:
        code = int(hexadecimal, 16) if hexadecimal else int(decimal)
        return bytes([code]) if code < 128 else b""  # base64 is ASCII
    return _NAMED[name] if name else b""  # CDATA markers and backslashes go


def _plausible(data: bytes, offset: int) -> bool:
    head = data[offset : offset + 32]
    if head.startswith(b"BM"):
        if len(head) < 18:
            return False
        size, reserved, start, header = struct.unpack_from("<IIII", head, 2)
        return (
            reserved == 0
            and 26 <= size <= len(data) - offset
            and start < size
            and header in (12, 40, 52, 56, 64, 108, 124)
        )
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_describes_an_image(data[offset:])
    return True


def _tiff_describes_an_image(blob: bytes) -> bool:
    """A TIFF header whose first IFD has a size and image data (a MakerNote's own TIFF
    header, which only holds tags, is not an image)."""
    try:
        order = "<" if blob[:2] == b"II" else ">"
        (first,) = struct.unpack_from(order + "I", blob, 4)
        (entries,) = struct.unpack_from(order + "H", blob, first)
        tags = {
            struct.unpack_from(order + "H", blob, first + 2 + 12 * i)[0] for i in range(entries)
        }
    except struct.error:
        return False
    return {256, 257} <= tags and bool(tags & {273, 324, 513})
