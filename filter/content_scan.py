"""Where images hide inside image files: the parts of the content rule (`filter.content`)
that read structures several formats share.

- `scan`: a free-form payload (text, comments, ICC profiles, EXIF values and MakerNotes,
  XMP, C2PA/JUMBF) searched for embedded image files, by their signatures and as base64
  text (an XMP thumbnail, a data URI in a JSON workflow);
- `walk_tiff`: a TIFF structure, i.e. a TIFF file or the EXIF block of a JPEG, PNG or
  WebP: its IFDs, their values, the image data they point to, the EXIF thumbnail (IFD1,
  compressed or as uncompressed strips) and SubIFDs;
- `walk_photoshop`: Photoshop image resources (JPEG APP13, TIFF tag 34377), whose
  thumbnails are JPEGs.

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
# Line breaks inside base64 text as XMP, JSON and XML write them, then whitespace: removed
# in two passes (the same result as one) since a regular expression over every whitespace
# byte of a large payload (a JPEG's scan data) is several times slower.
_TEXT_BREAKS = re.compile(rb"&#(?:x[aAdD]|1[03]);|\\[nr]?")
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
    return _TEXT_BREAKS.sub(b"", text).translate(None, _WHITESPACE)


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


_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_IFD_POINTERS = {34665: "EXIF IFD", 34853: "GPS IFD", 40965: "interoperability IFD"}
_SUBIFDS = 330
_PHOTOSHOP_LAYERS = 37724  # ImageSourceData: Photoshop's layers, images of their own
_PHOTOSHOP_RESOURCES = 34377
_MAX_IFDS = 256
_MAX_ENTRIES = 4096


class _Malformed(Exception):
    pass


@dataclass
class _Tiff:
    blob: bytes
    order: str
    data_ranges: list[tuple[int, int]] = field(default_factory=list)  # decoded, not scanned
    covered_end: int = 8

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        try:
            return struct.unpack_from(self.order + fmt, self.blob, offset)
        except struct.error:
            raise _Malformed(f"a value at byte {offset} lies outside it") from None

    def cover(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > len(self.blob):
            raise _Malformed(f"an offset points outside it ({start}+{length})")
        self.covered_end = max(self.covered_end, start + length)

    def values(self, entry: tuple[int, int, int, int], value_offset: int) -> list[int]:
        _tag, kind, number, _ = entry
        if kind not in (3, 4, 13, 8, 9):
            raise _Malformed(f"tag {entry[0]} holds type {kind}, not offsets or sizes")
        size = _TYPE_SIZES[kind]
        letter = {2: "H", 4: "I"}[size] if kind in (3, 4, 13) else {2: "h", 4: "i"}[size]
        return list(self.unpack(letter * number, value_offset))

    def patched(self, ifd: int) -> bytes:
        """The same bytes with this IFD first: PIL then decodes it as page 0 (offsets are
        absolute, so nothing else moves)."""
        return self.blob[:4] + struct.pack(self.order + "I", ifd) + self.blob[8:]


def walk_tiff(blob: bytes, where: str, layout: Layout, *, file: bool) -> None:
    """Account for a TIFF structure. A file (`file`): its pages are decoded as frames,
    SubIFDs here, and bytes after its last structure are unaccounted. An EXIF block: IFD1
    is the thumbnail. Both: everything that is not image data is scanned."""
    if blob[:4] not in (b"II*\x00", b"MM\x00*"):
        if blob[:4] in (b"II+\x00", b"MM\x00+"):
            layout.unread(f"{where} is a BigTIFF structure, which facegate does not read")
        else:
            layout.unread(f"{where} does not start with a TIFF header")
        return
    tiff = _Tiff(blob, "<" if blob[:2] == b"II" else ">", data_ranges=[(0, 8)])
    try:
        _walk_ifds(tiff, where, layout, file=file)
    except _Malformed as exc:
        layout.unread(f"{where} is malformed: {exc}")
        return
    end = tiff.covered_end if file else len(blob)
    start = 0
    for low, high in [*sorted(tiff.data_ranges), (end, end)]:
        if low > start:
            scan(blob[start:low], where, layout)
        start = max(start, high)
    if file:
        layout.end = end


def _walk_ifds(tiff: _Tiff, where: str, layout: Layout, *, file: bool) -> None:
    (first,) = tiff.unpack("I", 4)
    queue: list[tuple[int, str]] = [(first, "page" if file else "IFD0")]
    seen: set[int] = set()
    subifds = 0
    while queue:
        offset, kind = queue.pop(0)
        if offset == 0 or offset in seen:
            continue
        if len(seen) >= _MAX_IFDS:
            raise _Malformed(f"more than {_MAX_IFDS} IFDs")
        seen.add(offset)
        entries = _read_ifd(tiff, offset)
        (next_ifd,) = tiff.unpack("I", offset + 2 + 12 * len(entries))
        if kind in ("page", "IFD0", "thumbnail", "SubIFD"):
            following = {"IFD0": "thumbnail", "thumbnail": "thumbnail"}.get(kind, kind)
            queue.append((next_ifd, following))
        tags = {entry[0]: entry for entry in entries}
        for tag, entry in tags.items():
            value_offset = _value_offset(tiff, entry)
            if tag in _IFD_POINTERS:
                queue += [(o, _IFD_POINTERS[tag]) for o in tiff.values(entry, value_offset)]
            elif tag == _SUBIFDS:
                queue += [(o, "SubIFD") for o in tiff.values(entry, value_offset)]
            elif tag == _PHOTOSHOP_LAYERS:
                layout.unread(
                    f"{where} holds Photoshop layer data (tag 37724), which facegate does "
                    "not decode"
                )
            elif tag == _PHOTOSHOP_RESOURCES:
                size = _TYPE_SIZES.get(entry[1], 1) * entry[2]
                tiff.data_ranges.append((value_offset, value_offset + size))
                walk_photoshop(tiff.blob[value_offset : value_offset + size], where, layout)
        _image_data(tiff, tags, offset, entries, kind, where, layout)
        if kind == "SubIFD":
            subifds += 1
            layout.embedded.append(
                Embedded(f"{where} SubIFD image {subifds}", tiff.patched(offset), False)
            )


def _read_ifd(tiff: _Tiff, offset: int) -> list[tuple[int, int, int, int]]:
    (entries,) = tiff.unpack("H", offset)
    if entries > _MAX_ENTRIES:
        raise _Malformed(f"an IFD claims {entries} entries")
    tiff.cover(offset, 2 + 12 * entries + 4)
    tiff.data_ranges.append((offset, offset + 2 + 12 * entries + 4))  # parsed, not free-form
    out = []
    for i in range(entries):
        tag, kind, number = tiff.unpack("HHI", offset + 2 + 12 * i)
        out.append((tag, kind, number, offset + 2 + 12 * i + 8))
    return out


def _value_offset(tiff: _Tiff, entry: tuple[int, int, int, int]) -> int:
    """Where an entry's value lies (inline in the entry when it fits in 4 bytes)."""
    _tag, kind, number, field_offset = entry
    size = _TYPE_SIZES.get(kind)
    if size is None:
        return field_offset  # an unknown type: its value, if elsewhere, is scanned as a gap
    total = size * number
    if total <= 4:
        return field_offset
    (offset,) = tiff.unpack("I", field_offset)
    tiff.cover(offset, total)
    return int(offset)


def _image_data(
    tiff: _Tiff,
    tags: dict[int, tuple[int, int, int, int]],
    ifd: int,
    entries: list[tuple[int, int, int, int]],
    kind: str,
    where: str,
    layout: Layout,
) -> None:
    """Strips, tiles and JPEG thumbnails: decoded (as pages, SubIFDs or the thumbnail),
    so covered and not scanned."""
    jpeg = None
    for offsets_tag, sizes_tag in ((273, 279), (324, 325), (513, 514)):
        if offsets_tag not in tags:
            continue
        if sizes_tag not in tags:
            raise _Malformed(f"tag {offsets_tag} without its sizes (tag {sizes_tag})")
        offsets = tiff.values(tags[offsets_tag], _value_offset(tiff, tags[offsets_tag]))
        sizes = tiff.values(tags[sizes_tag], _value_offset(tiff, tags[sizes_tag]))
        if len(offsets) != len(sizes):
            raise _Malformed(f"{len(offsets)} data offsets but {len(sizes)} sizes")
        for start, size in zip(offsets, sizes, strict=True):
            tiff.cover(start, size)
            tiff.data_ranges.append((start, start + size))
        if offsets_tag == 513 and offsets:
            jpeg = tiff.blob[offsets[0] : offsets[0] + sizes[0]]
    if kind != "thumbnail":
        return
    if jpeg is not None:
        layout.embedded.append(Embedded(f"{where} thumbnail", jpeg))
    elif 273 in tags or 324 in tags:
        layout.embedded.append(Embedded(f"{where} thumbnail", tiff.patched(ifd), False))


_PHOTOSHOP_THUMBNAILS = {0x0409: True, 0x040C: False}  # resource id: stored as BGR
_RESOURCE_SIGNATURES = (b"8BIM", b"MeSa", b"PHUT", b"AgHg", b"DCSR")


def walk_photoshop(payload: bytes, where: str, layout: Layout) -> None:
    """Photoshop image resources: thumbnails decoded, every other resource scanned."""
    pos = 0
    while pos < len(payload):
        if payload[pos:].strip(b"\x00") == b"":
            return
        if payload[pos : pos + 4] not in _RESOURCE_SIGNATURES or pos + 7 > len(payload):
            layout.unread(f"the Photoshop resources in {where} are malformed at byte {pos}")
            return
        (resource,) = struct.unpack_from(">H", payload, pos + 4)
        name_length = payload[pos + 6]
        pos += 6 + (1 + name_length + 1) // 2 * 2
        if pos + 4 > len(payload):
            layout.unread(f"the Photoshop resources in {where} are truncated")
            return
        (size,) = struct.unpack_from(">I", payload, pos)
        data = payload[pos + 4 : pos + 4 + size]
        if len(data) != size:
            layout.unread(f"the Photoshop resources in {where} are truncated")
            return
        pos += 4 + (size + 1) // 2 * 2
        if resource in _PHOTOSHOP_THUMBNAILS:
            if len(data) < 28 or struct.unpack_from(">I", data, 0)[0] != 1:
                layout.unread(
                    f"a Photoshop thumbnail in {where} in a format facegate does not read"
                )
                continue
            layout.embedded.append(
                Embedded(
                    "Photoshop thumbnail",
                    data[28:],
                    swap_red_blue=_PHOTOSHOP_THUMBNAILS[resource],
                )
            )
        else:
            scan(data, f"Photoshop resource {resource:#06x} in {where}", layout)
