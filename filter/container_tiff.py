"""TIFF structures and Photoshop image resources, for the content rule (`filter.content`).

- `walk_tiff`: a TIFF structure, i.e. a TIFF file or the EXIF block of a JPEG, PNG or
  WebP: its IFDs, their values, the image data they point to, the EXIF thumbnail (IFD1,
  compressed or as uncompressed strips) and SubIFDs;
- `walk_photoshop`: Photoshop image resources (JPEG APP13, TIFF tag 34377), whose
  thumbnails are JPEGs.

Image data is recorded in the `Layout` to be decoded and checked; every other byte is
searched by `filter.content_scan.scan`; what cannot be read makes the file
`unchecked_content`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from filter.content_scan import Embedded, Layout, scan

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_IFD_POINTERS = {34665: "EXIF IFD", 34853: "GPS IFD", 40965: "interoperability IFD"}
_SUBIFDS = 330
_PHOTOSHOP_LAYERS = 37724  # ImageSourceData: Photoshop's layers, images of their own
_PHOTOSHOP_RESOURCES = 34377
_JPEG_TABLES = 347  # the tables a JPEG-compressed TIFF's strips share: part of the image
# Tags read by the rules below (what PIL decodes other than libtiff shows).
_BITS, _COMPRESSION, _PHOTOMETRIC, _FILL_ORDER, _PLANAR = 258, 259, 262, 266, 284
_COLOR_MAP, _TILE_OFFSETS, _SAMPLE_FORMAT, _STRIP_OFFSETS = 320, 324, 339, 273
_EXTRA_SAMPLES = 338
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
            elif tag in (_JPEG_TABLES, _PHOTOSHOP_RESOURCES):
                size = _TYPE_SIZES.get(entry[1], 1) * entry[2]
                tiff.data_ranges.append((value_offset, value_offset + size))
                if tag == _PHOTOSHOP_RESOURCES:
                    walk_photoshop(tiff.blob[value_offset : value_offset + size], where, layout)
        _image_data(tiff, tags, offset, entries, kind, where, layout)
        if kind in ("page", "SubIFD", "thumbnail"):  # the IFDs PIL decodes as images
            _decoded_otherwise(tiff, tags, where, layout)
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
        # Tools extract a JPEG that tags 513/514 point to from any IFD (exiftool's
        # OtherImage): checked too, except as an old-style JPEG page, which is the page.
        old_style = kind == "page" and _numbers(tiff, tags, _COMPRESSION)[:1] == [6]
        if jpeg is not None and not old_style:
            layout.embedded.append(Embedded(f"{where} {kind} JPEG (tag 513)", jpeg))
        return
    if jpeg is not None:
        layout.embedded.append(Embedded(f"{where} thumbnail", jpeg))
    elif 273 in tags or 324 in tags:
        layout.embedded.append(Embedded(f"{where} thumbnail", tiff.patched(ifd), False))


def _numbers(tiff: _Tiff, tags: dict[int, tuple[int, int, int, int]], tag: int) -> list[int]:
    """A SHORT or LONG tag's values ([] when absent or of another type)."""
    entry = tags.get(tag)
    if entry is None or entry[1] not in (3, 4):
        return []
    return tiff.values(entry, _value_offset(tiff, entry))


def _decoded_otherwise(
    tiff: _Tiff, tags: dict[int, tuple[int, int, int, int]], where: str, layout: Layout
) -> None:
    """Unread where PIL decodes an image other than libtiff (and the viewers built on it)
    shows it, each found by decoding both: a face in libtiff's could be in none of PIL's."""

    def numbers(tag: int) -> list[int]:
        return _numbers(tiff, tags, tag)

    bits = numbers(_BITS) or [1]
    compression, photometric = numbers(_COMPRESSION)[:1] or [1], numbers(_PHOTOMETRIC)[:1]
    reasons = []
    if _STRIP_OFFSETS in tags and _TILE_OFFSETS in tags:
        reasons.append("both strips and tiles (PIL decodes the strips, libtiff the tiles)")
    planar = numbers(_PLANAR)[:1] == [2] and compression == [1]
    if planar and (max(bits) > 8 or numbers(_FILL_ORDER)[:1] == [2]):
        reasons.append(
            "uncompressed planes of 16 bits or in reversed bit order, which PIL misreads"
        )
    if photometric == [0] and max(bits) > 8:
        reasons.append("WhiteIsZero samples of over 8 bits, which PIL does not invert")
    if 2 in numbers(_SAMPLE_FORMAT) and max(bits) > 8:
        reasons.append("signed samples of over 8 bits, which libtiff's readers show unsigned")
    if 0 in numbers(_EXTRA_SAMPLES):
        reasons.append(
            "an extra sample of unspecified meaning (TIFF ExtraSamples 0), which libtiff's "
            "RGBA reader shows as alpha and PIL drops"
        )
    colours = numbers(_COLOR_MAP)
    if photometric == [3] and colours and max(colours) < 256:
        reasons.append("a ColorMap of 8-bit values, which readers take as 8-bit and PIL as 16")
    for reason in reasons:
        layout.unread(f"{where} has {reason}")


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
