"""JPEG and MPO structure for the content rule (`filter.containers` dispatches here):
markers and entropy-coded data (scanned for image files), frame, table and scan headers
(each exactly as long as its fields), the APPn segments that hold thumbnails (JFIF, JFXX,
EXIF, Photoshop, XMP) or other images (MPF: an MPO's further images), and the ones it
does not read, which leave the file unaccounted."""

from __future__ import annotations

import struct

from filter.container_tiff import walk_photoshop, walk_tiff
from filter.content_scan import Embedded, Layout, scan

EXIF_HEADERS = (b"Exif\x00\x00", b"Exif\x00\xff")

# Markers without a length: SOI, EOI, RSTn, TEM.
_STANDALONE = {0xD8, 0xD9, 0x01, *range(0xD0, 0xD8)}
# Frames, tables, restarts: SOF0-15 (C4 is DHT, CC is DAC), DQT, DNL, DRI, DHP, EXP. Not
# JPG (C8), reserved for extensions.
_JPEG_STRUCTURE = {*range(0xC0, 0xD0), 0xDB, 0xDC, 0xDD, 0xDE, 0xDF} - {0xC8}


def walk_jpeg(data: bytes, layout: Layout) -> None:
    end, segments = _jpeg_stream(data, 0, layout)
    if end is None:
        return
    claimed = _jpeg_metadata(data, segments, layout)
    # MPO: the images the MPF index lists follow the first; anything else is unaccounted.
    for number, (start, size) in enumerate(sorted(claimed), start=2):
        if start < end:
            layout.unread(f"an MPF entry points inside the first image (byte {start})")
            return
        if not _zeros(data[end:start]):
            layout.unread(f"{start - end} bytes between the JPEG images at byte {end}")
        sub_end, sub_segments = _jpeg_stream(data[: start + size], start, layout)
        if sub_end is None:
            return
        _jpeg_metadata(data, sub_segments, layout, nested=True)
        layout.embedded.append(
            Embedded(f"MPO image {number}", data[start:sub_end], whole_file=False)
        )
        if not _zeros(data[sub_end : start + size]):
            layout.unread(f"{start + size - sub_end} bytes inside the MPF image at byte {start}")
        end = start + size
    layout.end = end


def _zeros(data: bytes) -> bool:
    return not data.strip(b"\x00")


Segment = tuple[int, bytes, int]  # marker, body, where the body starts in the file


def _jpeg_stream(data: bytes, start: int, layout: Layout) -> tuple[int | None, list[Segment]]:
    """(end of the stream, its APPn/COM segments) or (None, ...) when it is malformed."""
    if data[start : start + 2] != b"\xff\xd8":
        layout.unread(f"no JPEG start marker at byte {start}")
        return None, []
    pos = start + 2
    segments: list[Segment] = []
    while True:
        while (
            pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF
        ):
            pos += 1  # fill bytes
        if pos + 2 > len(data) or data[pos] != 0xFF:
            layout.unread(f"the JPEG structure breaks at byte {pos}")
            return None, segments
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2, segments
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > len(data):
            layout.unread(f"the JPEG segment at byte {pos} is truncated")
            return None, segments
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            layout.unread(f"the JPEG segment at byte {pos} is truncated")
            return None, segments
        next_pos = pos + 2 + length
        if marker == 0xDA or marker in _JPEG_STRUCTURE:
            size = _structure_size(marker, body)
            if size != len(body):
                layout.unread(
                    f"a JPEG {_structure_name(marker)} segment at byte {pos} holds "
                    f"{len(body)} bytes, not the {size} its fields take"
                )
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not RSTn
            scan_end = _after_scan(data, next_pos)
            # A decoder reads only the codes it needs and skips the rest up to the next
            # marker: whatever image file hides there is carved out by the scan.
            scan(data[next_pos:scan_end], f"the JPEG scan data at byte {next_pos}", layout)
            next_pos = scan_end
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            segments.append((marker, body, pos + 4))
        elif marker not in _JPEG_STRUCTURE:
            layout.unread(f"a JPEG marker {marker:#04x} that facegate does not read")
        pos = next_pos


_STRUCTURE_NAMES = {0xC4: "DHT", 0xCC: "DAC", 0xDA: "SOS", 0xDB: "DQT", 0xDC: "DNL"}
_STRUCTURE_NAMES |= {0xDD: "DRI", 0xDE: "DHP", 0xDF: "EXP"}


def _structure_name(marker: int) -> str:
    return _STRUCTURE_NAMES.get(marker, f"SOF{marker - 0xC0}")


def _structure_size(marker: int, body: bytes) -> int:
    """How many bytes a frame, table or scan header takes by its own fields (ITU T.81,
    B.2-B.3): the rest of its segment would be read by no decoder."""
    fixed = {0xDC: 2, 0xDD: 2, 0xDF: 1}.get(marker)
    if fixed is not None:
        return fixed
    if marker == 0xDA:  # Ns, a selector pair per component, Ss, Se, Ah/Al
        return 4 + 2 * body[0] if body else 1
    if marker == 0xCC:  # conditioning entries of two bytes
        return len(body) - len(body) % 2
    if marker in (0xC4, 0xDB):
        at = 0
        while at < len(body):
            if marker == 0xDB:  # Pq/Tq, then 64 values of one or two bytes
                at += 1 + 64 * (2 if body[at] >> 4 else 1)
            elif at + 17 > len(body):  # Tc/Th, 16 code counts, then that many values
                return at + 17
            else:
                at += 17 + sum(body[at + 1 : at + 17])
        return at
    return 6 + 3 * body[5] if len(body) > 5 else 6  # SOFn, DHP: P, Y, X, Nf, components


def _after_scan(data: bytes, pos: int) -> int:
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos


_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_EXTENSION = b"http://ns.adobe.com/xmp/extension/\x00"


def _jpeg_metadata(
    data: bytes, segments: list[Segment], layout: Layout, nested: bool = False
) -> list[tuple[int, int]]:
    """Account for the APPn and COM segments of one JPEG stream; returns the MPF entries
    (absolute start, size) of the images after it."""
    joined: dict[str, bytearray] = {"ICC profile": bytearray(), "Photoshop": bytearray()}
    jumbf: dict[bytes, bytearray] = {}
    extended_xmp: dict[bytes, list[tuple[int, int, bytes]]] = {}  # GUID: (length, offset, part)
    claimed: list[tuple[int, int]] = []
    icc_parts: list[bytes] = []  # (sequence number, count) of each ICC_PROFILE segment
    for marker, body, at in segments:
        if marker == 0xFE:
            scan(body, "a JPEG comment", layout)
        elif marker == 0xE0:
            _app0(body, layout)
        elif marker == 0xE1 and body[:6] in EXIF_HEADERS:
            walk_tiff(body[6:], "EXIF", layout, file=False)
        elif marker == 0xE1 and body.startswith(_XMP):
            scan(body[len(_XMP) :], "the XMP packet", layout)
        elif marker == 0xE1 and body.startswith(_XMP_EXTENSION):
            head = len(_XMP_EXTENSION)
            if len(body) < head + 40:
                layout.unread("an extended XMP segment shorter than its header")
            else:
                length, offset = struct.unpack_from(">II", body, head + 32)
                part = (length, offset, body[head + 40 :])
                extended_xmp.setdefault(body[head : head + 32], []).append(part)
        elif marker == 0xE2 and body.startswith(b"ICC_PROFILE\x00"):
            joined["ICC profile"].extend(body[14:])
            icc_parts.append(body[12:14] if len(body) >= 14 else b"")
        elif marker == 0xE2 and body.startswith(b"MPF\x00"):
            walk_tiff(body[4:], "the MPF segment", layout, file=False)
            if not nested:  # an MPO's later images carry attributes only
                claimed += _mpf_entries(body, at + 4, layout)
        elif marker == 0xEB and body.startswith(b"JP"):
            # JUMBF (C2PA) split over segments: each repeats the box header after the first.
            box = jumbf.get(body[2:4])
            if box is None:
                jumbf[body[2:4]] = bytearray(body[8:])
            else:
                box.extend(body[16:])
        elif marker == 0xEC:
            scan(body, "a JPEG APP12 segment", layout)
        elif marker == 0xED and body.startswith(b"Photoshop 3.0\x00"):
            joined["Photoshop"].extend(body[14:])
        elif marker == 0xEE and body.startswith(b"Adobe"):
            # Version, two flag words and the colour transform take 12 bytes; none follow.
            scan(body[12:], "the JPEG APP14 Adobe segment", layout)
        else:
            ident = body[:12].split(b"\x00")[0].decode("latin-1", "replace")
            layout.unread(
                f"a JPEG APP{marker - 0xE0} segment ({ident!r}) that facegate does not read"
            )
    if icc_parts and not _one_icc_profile(icc_parts):
        # Decoders disagree on such a set: Pillow drops the whole profile, libjpeg (and
        # browsers) skip a short segment and keep the rest, so viewers would apply a
        # profile the filter never saw.
        layout.unread("ICC profile segments that do not make one profile (numbered 1 to N)")
    scan(bytes(joined["ICC profile"]), "the ICC profile", layout)
    walk_photoshop(bytes(joined["Photoshop"]), "the Photoshop resources", layout)
    for box in jumbf.values():
        scan(bytes(box), "the JUMBF (C2PA) boxes", layout)
    for parts in extended_xmp.values():
        packet = _extended_xmp(parts)
        if packet is None:
            layout.unread("extended XMP segments that do not make one packet by their offsets")
        else:
            scan(packet, "the extended XMP packet", layout)
    return claimed


def _extended_xmp(parts: list[tuple[int, int, bytes]]) -> bytes | None:
    """An extended XMP packet as readers assemble it, each part at its offset (not in file
    order); None unless the parts agree on its length and fill it exactly once."""
    lengths = {length for length, _, _ in parts}
    packet = bytearray()
    for _, offset, part in sorted(parts, key=lambda entry: entry[1]):
        if offset != len(packet):
            return None
        packet += part
    return bytes(packet) if lengths == {len(packet)} else None


def _one_icc_profile(parts: list[bytes]) -> bool:
    """Whether the ICC_PROFILE segments are one profile: each holds its sequence number
    and the count, all give the same count, and the numbers are 1 to that count once."""
    if any(len(part) != 2 for part in parts):
        return False
    counts = {part[1] for part in parts}
    return len(counts) == 1 and sorted(part[0] for part in parts) == list(
        range(1, counts.pop() + 1)
    )


def _app0(body: bytes, layout: Layout) -> None:
    if body.startswith(b"JFIF\x00") and len(body) >= 14:
        width, height = body[12], body[13]
        thumbnail = body[14 : 14 + 3 * width * height]
        if width * height:
            layout.raw.append(("JFIF thumbnail", thumbnail, width, height))
        if len(body) > 14 + 3 * width * height:
            scan(body[14 + 3 * width * height :], "the JFIF segment", layout)
    elif body.startswith(b"JFXX\x00") and len(body) >= 6:
        code, rest = body[5], body[6:]
        if code == 0x10:
            layout.embedded.append(Embedded("JFXX thumbnail", rest))
        elif code in (0x11, 0x13) and len(rest) >= 2:
            width, height = rest[0], rest[1]
            if code == 0x13:
                pixels = rest[2 : 2 + 3 * width * height]
            else:  # one palette index a pixel, then 256 RGB palette entries first
                palette, indexes = rest[2:770], rest[770 : 770 + width * height]
                pixels = b"".join(palette[3 * i : 3 * i + 3] for i in indexes)
            layout.raw.append(("JFXX thumbnail", pixels, width, height))
        else:
            layout.unread(f"a JFXX extension {code:#04x} that facegate does not read")
    else:
        ident = body[:5].split(b"\x00")[0].decode("latin-1", "replace")
        layout.unread(f"a JPEG APP0 segment ({ident!r}) that facegate does not read")


def _mpf_entries(body: bytes, header: int, layout: Layout) -> list[tuple[int, int]]:
    """MPF (CIPA DC-007): the offsets in its MP entries count from its own TIFF header,
    at byte `header` of the file."""
    tiff = body[4:]
    try:
        order = "<" if tiff[:2] == b"II" else ">"
        (first,) = struct.unpack_from(order + "I", tiff, 4)
        (entries,) = struct.unpack_from(order + "H", tiff, first)
        for i in range(entries):
            tag, _kind, number, value = struct.unpack_from(order + "HHII", tiff, first + 2 + 12 * i)
            if tag != 0xB002:
                continue
            out = []
            for k in range(number // 16):
                _attr, size, offset = struct.unpack_from(order + "III", tiff, value + 16 * k)
                if offset:  # the first entry is the first image itself (offset 0)
                    out.append((header + offset, size))
            return out
    except struct.error:
        pass
    layout.unread("the JPEG's MPF index is malformed")
    return []
