"""PNG and APNG structure for the content rule (`filter.containers` dispatches here).

Every chunk is image data, a field of the size the PNG specification gives it, metadata
scanned for embedded images, or unaccounted. Image data is inflated once more here: each
frame's zlib stream must end with its last chunk and hold exactly the frame's rows, since
a decoder stops at the rows it needs and never reads what follows. APNG frames count only
as far as the acTL chunk announces them: a decoder shows no more. How the frames are
composed (fcTL's rectangle, dispose_op and blend_op) is checked in filter.container_apng.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from filter.container_apng import Colours, Control, check_composition
from filter.container_tiff import walk_photoshop, walk_tiff
from filter.content_scan import Layout, scan

# Compressed metadata (zTXt, iTXt, iCCP) inflates to at most this much before it is scanned.
MAX_INFLATED = 16 * 1024 * 1024

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
# Chunks of one size whatever the image.
# cICP's colour primaries, transfer function and matrix for sRGB (ITU-T H.273: BT.709
# primaries, the sRGB transfer, RGB); its fourth byte (full range) changes nothing here.
_CICP_SRGB = bytes((1, 13, 0))
_FIXED_SIZE = {
    b"IHDR": 13, b"IEND": 0, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"cICP": 4, b"mDCv": 24,
    b"cLLi": 8, b"pHYs": 9, b"tIME": 7, b"acTL": 8, b"fcTL": 26, b"oFFs": 9, b"sTER": 1,
    b"gIFg": 4,
}  # fmt: skip
# Sizes that depend on the colour type (bKGD, sBIT, tRNS) or on the palette (hIST, tRNS).
_BKGD = {0: 2, 4: 2, 2: 6, 6: 6, 3: 1}
_SBIT = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_TRNS = {0: 2, 2: 6}
# At most one of each (PNG 3rd edition, 5.6); a second is unread by decoders.
_ONCE = {
    b"IHDR", b"PLTE", b"tRNS", b"cHRM", b"gAMA", b"sBIT", b"sRGB", b"cICP", b"mDCv",
    b"cLLi", b"iCCP", b"bKGD", b"hIST", b"pHYs", b"tIME", b"acTL", b"oFFs", b"pCAL",
    b"sCAL", b"sTER", b"eXIf",
}  # fmt: skip
# What the colours and transparency of every frame depend on: before the first IDAT only
# (PNG 3rd edition, 5.6).
_BEFORE_IDAT = {b"PLTE", b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sRGB", b"sBIT", b"cICP", b"mDCv"}
_SCAL = re.compile(rb"[\x01\x02][0-9.eE+-]{1,32}\x00[0-9.eE+-]{1,32}")
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"caBX", b"gIFx", b"dSIG"}
# Variable fields whose values any bytes may fill (suggested palettes, calibration
# parameters): scanned like text.
_PNG_SCANNED = {b"sPLT", b"pCAL"}
# Private chunks that common writers add, each a few fixed fields (ImageMagick's virtual
# page, canvas and orientation, Apple's iDOT, Android's nine-patch): read when they are
# too small to hold an image.
_PNG_SMALL_PRIVATE = {b"vpAg", b"caNv", b"orNT", b"iDOT", b"npTc", b"npOl", b"npLb"}
SMALL_CHUNK = 64
_INFLATE_STEP = 1 << 20  # bytes inflated at a time when only their count matters
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


@dataclass
class _Stream:
    """One frame's image data: a zlib stream over its IDAT or fdAT chunks."""

    name: str
    rows: int  # the bytes its rows take, filter bytes included
    inflater: zlib._Decompress = field(default_factory=zlib.decompressobj)
    inflated: int = 0
    flagged: bool = False

    def feed(self, data: bytes, layout: Layout) -> None:
        if self.flagged or not data:
            return
        if self.inflater.eof:
            self.flag(f"{len(data)} bytes after {self.name}'s compressed stream", layout)
            return
        step = 64 * 1024  # input fed in pieces: each unconsumed tail is a copy
        for at in range(0, len(data), step):
            piece = data[at : at + step]
            while piece and not self.inflater.eof:
                try:
                    out = self.inflater.decompress(piece, _INFLATE_STEP)
                except zlib.error as exc:
                    self.flag(f"{self.name}'s compressed stream is broken: {exc}", layout)
                    return
                self.inflated += len(out)
                if self.inflated > self.rows:
                    self.flag(f"{self.name} inflates past its rows' {self.rows} bytes", layout)
                    return
                piece = self.inflater.unconsumed_tail
            if self.inflater.eof:
                after = len(self.inflater.unused_data) + max(0, len(data) - at - step)
                if after:
                    self.flag(f"{after} bytes after {self.name}'s compressed stream", layout)
                return

    def finish(self, layout: Layout) -> None:
        if self.flagged:
            return
        if not self.inflater.eof:
            self.flag(f"{self.name}'s compressed stream does not end", layout)
        elif self.inflated != self.rows:
            what = f"{self.name} inflates to {self.inflated} bytes, not its rows' {self.rows}"
            self.flag(what, layout)

    def flag(self, what: str, layout: Layout) -> None:
        self.flagged = True
        layout.unread(what)


@dataclass
class _Png:
    colour: int = 0
    depth: int = 8
    size: tuple[int, int] = (0, 0)
    transparency: bytes | None = None  # tRNS
    interlaced: bool = False
    palette: int = 0  # entries
    seen: set[bytes] = field(default_factory=set)
    frames: int | None = None  # acTL's count, when it comes before IDAT
    controls: int = 0  # fcTL chunks
    frames_read: list[Control] = field(default_factory=list)  # fcTL chunks within acTL's count
    streams: list[_Stream] = field(default_factory=list)
    idat: _Stream | None = None  # the default image
    last: bytes = b""  # the previous chunk's type

    def rows(self, width: int, height: int) -> int:
        bits = _CHANNELS.get(self.colour, 4) * self.depth
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            columns, lines = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if columns > 0 and lines > 0:
                total += lines * (1 + (columns * bits + 7) // 8)
        return total


def walk_png(data: bytes, layout: Layout) -> None:
    png = _Png()
    pos = 8
    while True:
        if pos + 8 > len(data):
            layout.unread(f"the PNG chunks end without IEND at byte {pos}")
            return
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            layout.unread(f"the PNG chunk {_name(kind)} at byte {pos} is truncated")
            return
        at, pos = pos, pos + 12 + length
        if at == 8 and (kind != b"IHDR" or length != 13):
            layout.unread("the PNG does not start with a 13-byte IHDR chunk")
            return
        _chunk(png, kind, body, at, layout)
        png.last = kind
        if kind == b"IEND":
            break
    for stream in png.streams:
        stream.finish(layout)
    colours = Colours(png.colour, png.depth, png.transparency)
    check_composition(png.frames_read, png.size, colours, layout)
    layout.end = pos


def _chunk(png: _Png, kind: bytes, body: bytes, at: int, layout: Layout) -> None:
    where = f"the PNG {_name(kind)} chunk"
    if kind in _BEFORE_IDAT and b"IDAT" in png.seen:
        # Out of order: PIL applies a late tRNS to an APNG's later frames, browsers never.
        layout.unread(
            f"{where} at byte {at}, after the image data, which decoders apply differently"
        )
        return
    if kind in _ONCE:
        if kind in png.seen:
            layout.unread(f"a second {_name(kind)} chunk at byte {at}")
            return
        png.seen.add(kind)
    size = _size(png, kind, body)
    if size is not None and size != len(body):
        if kind == b"IEND":
            layout.unread(f"IEND with a {len(body)}-byte body")
        elif size < 0:
            layout.unread(f"{where} at byte {at}, which this image's colours do not allow")
        else:
            layout.unread(f"{where} at byte {at} holds {len(body)} bytes, not {size}")
        return
    if kind == b"IHDR":
        width, height, png.depth, png.colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        png.size = width, height
        png.interlaced = interlace == 1
        png.idat = _Stream("IDAT", png.rows(width, height))
    elif kind == b"PLTE":
        png.palette = len(body) // 3
    elif kind == b"tRNS":
        png.transparency = body
        if png.colour == 2 and png.depth == 16:
            # PIL decodes 16-bit colour to 8 bits a channel, where the transparent colour
            # cannot be told from its neighbours: what viewers show through is not known.
            layout.unread(
                f"{where} at byte {at}: a transparent colour in 16 bits a channel, which "
                "facegate cannot match exactly"
            )
    elif kind == b"acTL":
        frames = struct.unpack_from(">I", body)[0]
        if b"IDAT" not in png.seen:  # after IDAT, decoders ignore it
            png.frames = frames if 0 < frames <= 0x80000000 else 0
    elif kind in (b"IDAT", b"fdAT", b"fcTL"):
        _image_data(png, kind, body, at, layout)
    elif kind == b"cICP" and body[:3] != _CICP_SRGB:
        # Viewers that honour cICP (HDR transfer curves, other primaries) show other
        # pixels than the decoder gives the filter; filter.colour_views applies iCCP,
        # gAMA and cHRM, not these.
        layout.unread(f"{where} at byte {at} names colours other than sRGB's")
    elif kind == b"eXIf":
        walk_tiff(body, "EXIF", layout, file=False)
    elif kind in _PNG_TEXT:
        text = _png_text(kind, body, where, layout)
        scan(text, where, layout)
        if body.startswith(_RAW_PROFILE) and kind in (b"tEXt", b"zTXt", b"iTXt"):
            _raw_profile(body.partition(b"\x00")[0], text.rpartition(b"\x00")[2], layout)
    elif kind in _PNG_SCANNED:
        scan(body, where, layout)
    elif kind == b"sCAL":
        if not _SCAL.fullmatch(body):
            layout.unread(f"{where} at byte {at} is not a unit and two numbers")
    elif size is None and not (kind in _PNG_SMALL_PRIVATE and len(body) <= SMALL_CHUNK):
        layout.unread(f"a PNG chunk {_name(kind)} that facegate does not read")


def _size(png: _Png, kind: bytes, body: bytes) -> int | None:
    """The size the specification gives this chunk here (None: not a fixed-size chunk)."""
    if kind in _FIXED_SIZE:
        return _FIXED_SIZE[kind]
    if kind == b"bKGD":
        return _BKGD.get(png.colour, -1)
    if kind == b"sBIT":
        return _SBIT.get(png.colour, -1)
    if kind == b"hIST":
        return 2 * png.palette if png.palette else -1
    if kind == b"PLTE":
        entries = len(body) // 3
        return len(body) if 0 < entries <= 256 and not len(body) % 3 else -1
    if kind == b"tRNS":
        if png.colour == 3:
            return len(body) if 0 < len(body) <= png.palette else -1
        return _TRNS.get(png.colour, -1)
    return None


def _image_data(png: _Png, kind: bytes, body: bytes, at: int, layout: Layout) -> None:
    if kind == b"IDAT":
        if png.last != b"IDAT" and b"IDAT" in png.seen:
            layout.unread(f"an IDAT chunk apart from the first ones, at byte {at}")
            return
        png.seen.add(b"IDAT")
        if png.idat is not None:
            if png.idat not in png.streams:
                png.streams.append(png.idat)
            png.idat.feed(body, layout)
        return
    if not png.frames:
        layout.unread(f"an APNG {_name(kind)} chunk at byte {at} without a valid acTL before IDAT")
        return
    if kind == b"fcTL":
        png.controls += 1
        if png.controls > png.frames:
            layout.unread(
                f"APNG frame {png.controls} at byte {at}, beyond the {png.frames} frames "
                "acTL announces"
            )
            return
        width, height, x, y = struct.unpack_from(">IIII", body, 4)
        dispose, blend = body[24], body[25]
        box = (x, y, x + width, y + height)
        png.frames_read.append(Control(box, dispose, blend, b"IDAT" in png.seen))
        stream = _Stream(f"APNG frame {png.controls}", png.rows(width, height))
        if b"IDAT" in png.seen:
            png.streams.append(stream)
        elif png.idat is not None:  # the default image is the first frame: its IDAT
            png.idat.name = "IDAT (APNG frame 1)"
        return
    current = png.streams[-1] if png.streams else None
    if png.controls > png.frames or current is None or current is png.idat or len(body) < 4:
        layout.unread(f"an APNG fdAT chunk at byte {at} outside a frame")
        return
    current.feed(body[4:], layout)


# ImageMagick keeps a file's profiles in PNG text chunks, hex-encoded, and exiftool and
# ImageMagick read them back (an EXIF thumbnail, a Photoshop thumbnail, XMP).
_RAW_PROFILE = b"Raw profile type "
_EXIF_HEADER = b"Exif\x00\x00"


def _raw_profile(keyword: bytes, text: bytes, layout: Layout) -> None:
    """Decode an ImageMagick raw profile ("\\nNAME\\n  LENGTH\\nHEX...") and walk it as its
    kind of profile; one that does not decode is unaccounted."""
    name = keyword[len(_RAW_PROFILE) :].decode("latin-1").strip().lower()
    where = f"the PNG raw {name!r} profile"
    lines = text.lstrip(b"\n").split(b"\n", 2)
    try:
        length = int(lines[1])
        profile = bytes.fromhex(lines[2].decode("ascii"))
    except (IndexError, ValueError, UnicodeDecodeError):
        layout.unread(f"{where}, whose hex text facegate cannot decode")
        return
    if len(profile) != length:
        layout.unread(f"{where}, {len(profile)} bytes where it says {length}")
        return
    if profile.startswith(_EXIF_HEADER) and name in ("exif", "app1"):
        walk_tiff(profile[len(_EXIF_HEADER) :], "EXIF", layout, file=False)
    elif name == "exif" and profile[:4] in (b"II*\x00", b"MM\x00*"):
        walk_tiff(profile, "EXIF", layout, file=False)
    elif name == "8bim":
        walk_photoshop(profile, where, layout)
    else:
        scan(profile, where, layout)


def _png_text(kind: bytes, body: bytes, where: str, layout: Layout) -> bytes:
    """What a text chunk says: its keyword and other fields with its text (inflated when
    compressed), or a profile's name with its bytes."""
    keyword, _, rest = body.partition(b"\x00")
    if kind in (b"zTXt", b"iCCP"):
        return keyword + b"\x00" + _inflate(rest[1:], where, layout)
    if kind == b"iTXt":
        compressed = rest[:1] == b"\x01"
        language, _, rest = rest[2:].partition(b"\x00")
        translated, _, text = rest.partition(b"\x00")
        fields = b"\x00".join((keyword, language, translated, b""))
        return fields + (_inflate(text, where, layout) if compressed else text)
    return body


def _inflate(compressed: bytes, where: str, layout: Layout) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(compressed, MAX_INFLATED)
    except zlib.error as exc:
        layout.unread(f"{where} cannot be inflated: {exc}")
        return b""
    if inflater.unconsumed_tail:
        layout.unread(f"{where} inflates to more than {MAX_INFLATED} bytes")
        return b""
    if inflater.unused_data:
        layout.unread(f"{len(inflater.unused_data)} bytes after {where}'s compressed stream")
    return out


def _name(kind: bytes) -> str:
    return repr(kind.decode("latin-1"))
