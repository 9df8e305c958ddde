"""Probe files for the content rule: a harmless first image that also carries a hidden
one (an enrolled face), in every place issue 19 names and the rule reads. Built from
bytes, with small writers for the structures PIL does not write (EXIF IFD1 strips,
Photoshop resources, JFXX, SubIFDs)."""

from __future__ import annotations

import base64
import io
import itertools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def fresh(image: Image.Image | np.ndarray) -> Image.Image:
    """A new image with the same pixels (PIL keeps encoder settings on saved images)."""
    return Image.fromarray(np.asarray(image).astype(np.uint8)).convert("RGB")


def encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if "append_images" in options:
        options["append_images"] = [fresh(i) for i in options["append_images"]]  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    fresh(image).save(buffer, fmt, **options)
    return buffer.getvalue()


def load(path: object, size: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(str(path)).convert("RGB")
    if size is not None:
        image = image.resize(size)
    return np.asarray(image)


# TIFF structures -------------------------------------------------------------------


@dataclass
class Ifd:
    """Entries: tag -> (type, values): ints for SHORT (3) / LONG (4), bytes for UNDEFINED
    (7); a `Blob` value is stored elsewhere and the entry holds its offset (LONG)."""

    entries: dict[int, tuple[int, object]] = field(default_factory=dict)


@dataclass
class Blob:
    data: bytes
    size_tag: int | None = None  # the tag that gets len(data) (e.g. StripByteCounts)


@dataclass
class IfdPointer:
    ifd: Ifd


def tiff(ifds: list[Ifd], chain: bool = True) -> bytes:
    """A little-endian TIFF: header, then each IFD with its values and data. `chain`: IFD n
    points to IFD n+1 (IFD0 -> IFD1 in EXIF); IFDs reached through an IfdPointer entry are
    written too but not chained."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    positions: dict[int, int] = {}
    pending: list[tuple[int, Ifd]] = []  # (where to write its offset, ifd)
    order = list(ifds)
    for ifd in ifds:
        for _tag, (_kind, value) in ifd.entries.items():
            if isinstance(value, IfdPointer):
                order.append(value.ifd)
    next_slots: dict[int, int] = {}
    for ifd in order:
        positions[id(ifd)] = len(out)
        tags = sorted(ifd.entries)
        start = len(out)
        out += struct.pack("<H", len(tags)) + b"\x00" * (12 * len(tags)) + b"\x00\x00\x00\x00"
        next_slots[id(ifd)] = start + 2 + 12 * len(tags)
        for i, tag in enumerate(tags):
            kind, value = ifd.entries[tag]
            slot = start + 2 + 12 * i
            if isinstance(value, IfdPointer):
                struct.pack_into("<HHI", out, slot, tag, 4, 1)
                pending.append((slot + 8, value.ifd))
                continue
            if isinstance(value, Blob):
                struct.pack_into("<HHII", out, slot, tag, 4, 1, len(out))
                out += value.data
                if value.size_tag is not None:
                    ifd.entries[value.size_tag] = (4, [len(value.data)])
                continue
            raw = value if isinstance(value, bytes) else _pack(kind, value)  # type: ignore[arg-type]
            if len(raw) <= 4:
                struct.pack_into("<HHI", out, slot, tag, kind, _count(kind, raw))
                out[slot + 8 : slot + 8 + len(raw)] = raw
            else:
                struct.pack_into("<HHII", out, slot, tag, kind, _count(kind, raw), len(out))
                out += raw
            if len(out) % 2:
                out += b"\x00"
        # Size tags filled in by a Blob above are written now.
        for i, tag in enumerate(tags):
            kind, value = ifd.entries[tag]
            if isinstance(value, list) and tag in [
                b.size_tag for _k, b in ifd.entries.values() if isinstance(b, Blob)
            ]:
                struct.pack_into("<HHI", out, start + 2 + 12 * i, tag, 4, 1)
                struct.pack_into("<I", out, start + 2 + 12 * i + 8, value[0])
    struct.pack_into("<I", out, 4, positions[id(ifds[0])])
    if chain:
        for a, b in itertools.pairwise(ifds):
            struct.pack_into("<I", out, next_slots[id(a)], positions[id(b)])
    for slot, ifd in pending:
        struct.pack_into("<I", out, slot, positions[id(ifd)])
    return bytes(out)


def _pack(kind: int, values: list[int]) -> bytes:
    return struct.pack("<" + {3: "H", 4: "I"}[kind] * len(values), *values)


def _count(kind: int, raw: bytes) -> int:
    return len(raw) // {3: 2, 4: 4, 7: 1, 2: 1, 1: 1}[kind]


def strip_image(pixels: np.ndarray, extra: dict[int, tuple[int, object]] | None = None) -> Ifd:
    """An IFD describing an uncompressed RGB image stored as one strip."""
    height, width = pixels.shape[:2]
    entries: dict[int, tuple[int, object]] = {
        256: (4, [width]),
        257: (4, [height]),
        258: (3, [8, 8, 8]),
        259: (3, [1]),
        262: (3, [2]),
        273: (4, Blob(np.ascontiguousarray(pixels, np.uint8).tobytes(), size_tag=279)),
        277: (3, [3]),
        278: (4, [height]),
        279: (4, [0]),
        284: (3, [1]),
    }
    entries.update(extra or {})
    return Ifd(entries)


def exif_with_jpeg_thumbnail(thumbnail: bytes) -> bytes:
    ifd0 = Ifd({274: (3, [1])})
    ifd1 = Ifd({259: (3, [6]), 513: (4, Blob(thumbnail, size_tag=514)), 514: (4, [0])})
    return b"Exif\x00\x00" + tiff([ifd0, ifd1])


def exif_with_strip_thumbnail(pixels: np.ndarray) -> bytes:
    """The uncompressed thumbnail of issue 19: IFD1 StripOffsets, no JPEGInterchangeFormat."""
    return b"Exif\x00\x00" + tiff([Ifd({274: (3, [1])}), strip_image(pixels)])


def tiff_with_subifd(shown: np.ndarray, hidden: np.ndarray) -> bytes:
    sub = strip_image(hidden)
    return tiff([strip_image(shown, {330: (4, IfdPointer(sub))})], chain=False)


# JPEG segments ---------------------------------------------------------------------


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """The JPEG with these segments right after its APP0 (JFIF) segment."""
    (length,) = struct.unpack_from(">H", jpeg, 4)
    at = 4 + length
    return jpeg[:at] + b"".join(segments) + jpeg[at:]


def photoshop_thumbnail(jpeg_thumbnail: bytes, width: int, height: int) -> bytes:
    header = struct.pack(
        ">IIIIIIHH", 1, width, height, (width * 24 + 31) // 32 * 4, 0, len(jpeg_thumbnail), 24, 1
    )
    data = header + jpeg_thumbnail
    resource = b"8BIM" + struct.pack(">H", 0x040C) + b"\x00\x00" + struct.pack(">I", len(data))
    resource += data + (b"\x00" if len(data) % 2 else b"")
    return segment(0xED, b"Photoshop 3.0\x00" + resource)


def xmp_thumbnail(jpeg_thumbnail: bytes, width: int, height: int) -> bytes:
    encoded = base64.b64encode(jpeg_thumbnail).decode()
    wrapped = "&#xA;".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    xmp = (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:xmpGImg="http://ns.adobe.com/xap/1.0/g/img/"><xmp:Thumbnails><rdf:Alt><rdf:li '
        f'rdf:parseType="Resource"><xmpGImg:width>{width}</xmpGImg:width><xmpGImg:height>'
        f"{height}</xmpGImg:height><xmpGImg:format>JPEG</xmpGImg:format><xmpGImg:image>"
        f"{wrapped}</xmpGImg:image></rdf:li></rdf:Alt></xmp:Thumbnails></rdf:Description>"
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp.encode())


def jfxx_jpeg_thumbnail(jpeg_thumbnail: bytes) -> bytes:
    return segment(0xE0, b"JFXX\x00\x10" + jpeg_thumbnail)


def jfxx_rgb_thumbnail(pixels: np.ndarray) -> bytes:
    height, width = pixels.shape[:2]
    return segment(0xE0, b"JFXX\x00\x13" + bytes([width, height]) + pixels.tobytes())


def jfif_rgb_thumbnail(jpeg: bytes, pixels: np.ndarray) -> bytes:
    """The JPEG with its JFIF segment replaced by one carrying an RGB thumbnail."""
    height, width = pixels.shape[:2]
    (length,) = struct.unpack_from(">H", jpeg, 4)
    jfif = jpeg[6 : 6 + 12] + bytes([width, height]) + pixels.tobytes()
    return jpeg[:2] + segment(0xE0, jfif) + jpeg[4 + length :]


# PNG chunks -------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """The PNG with these chunks right after IHDR."""
    return png[:33] + b"".join(chunks) + png[33:]


def ztxt_base64_image(image_bytes: bytes) -> bytes:
    text = b"workflow\x00\x00" + zlib.compress(
        b'{"note": "data:image/png;base64,' + base64.b64encode(image_bytes) + b'"}'
    )
    return chunk(b"zTXt", text)


Builder = Callable[[np.ndarray, np.ndarray], bytes]


def hiding_places(thumb: tuple[int, int] = (120, 160)) -> dict[str, Builder]:
    """Files showing `shown` first and holding `hidden` somewhere else."""

    def small(hidden: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(hidden).resize(thumb))

    def jpeg_thumb(hidden: np.ndarray) -> bytes:
        return encode(small(hidden), "JPEG", quality=95)

    return {
        "png_after_iend": lambda s, h: encode(s, "PNG") + encode(h, "PNG"),
        "jpeg_after_eoi": lambda s, h: encode(s, "JPEG", quality=95) + encode(h, "JPEG"),
        "exif_strip_thumbnail": lambda s, h: encode(
            s, "JPEG", quality=95, exif=exif_with_strip_thumbnail(small(h))
        ),
        "exif_jpeg_thumbnail": lambda s, h: encode(
            s, "JPEG", quality=95, exif=exif_with_jpeg_thumbnail(jpeg_thumb(h))
        ),
        "gif_second_frame": lambda s, h: encode(s, "GIF", save_all=True, append_images=[h]),
        "apng_second_frame": lambda s, h: encode(s, "PNG", save_all=True, append_images=[h]),
        "photoshop_thumbnail": lambda s, h: with_segments(
            encode(s, "JPEG", quality=95), photoshop_thumbnail(jpeg_thumb(h), *thumb)
        ),
        "xmp_thumbnail": lambda s, h: with_segments(
            encode(s, "JPEG", quality=95), xmp_thumbnail(jpeg_thumb(h), *thumb)
        ),
        "jfxx_jpeg_thumbnail": lambda s, h: with_segments(
            encode(s, "JPEG", quality=95), jfxx_jpeg_thumbnail(jpeg_thumb(h))
        ),
        "jfxx_rgb_thumbnail": lambda s, h: with_segments(
            encode(s, "JPEG", quality=95),
            jfxx_rgb_thumbnail(np.asarray(Image.fromarray(h).resize((96, 128)))),
        ),
        "jfif_rgb_thumbnail": lambda s, h: jfif_rgb_thumbnail(
            encode(s, "JPEG", quality=95), np.asarray(Image.fromarray(h).resize((96, 128)))
        ),
        "tiff_subifd": tiff_with_subifd,
        "mpo_second_image": lambda s, h: encode(s, "MPO", save_all=True, append_images=[h]),
        "png_exif_thumbnail": lambda s, h: with_chunks(
            encode(s, "PNG"), chunk(b"eXIf", exif_with_jpeg_thumbnail(jpeg_thumb(h))[6:])
        ),
        "png_text_base64": lambda s, h: with_chunks(
            encode(s, "PNG"), ztxt_base64_image(encode(small(h), "PNG"))
        ),
        "webp_second_frame": lambda s, h: encode(
            s, "WEBP", save_all=True, append_images=[h], lossless=True
        ),
        "tiff_second_page": lambda s, h: encode(s, "TIFF", save_all=True, append_images=[h]),
    }


# Places where the content rule finds bytes it cannot read, and so does not check.
UNREADABLE_PLACES = {"png_after_iend", "jpeg_after_eoi"}


# The probe files of `facegate check` and `facegate batch`: a stranger shown, an enrolled
# face hidden in each place a file can carry one.
STRANGER = ("id05", "01.jpg")
ENROLLED = ("id02", "02.jpg")  # id02 is enrolled from all its photos, this one among them


def probe_files(folder: Path, identities_dir: Path) -> dict[str, Path]:
    shown = load(identities_dir.joinpath(*STRANGER))
    hidden = load(identities_dir.joinpath(*ENROLLED), (shown.shape[1], shown.shape[0]))
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for place, build in hiding_places().items():
        data = build(shown, hidden)
        kind = next((s for magic, s in _MAGIC if data.startswith(magic)), ".img")
        files[place] = folder / f"{place}{kind}"
        files[place].write_bytes(data)
    thumbnail = encode(np.asarray(_small(shown)), "JPEG", quality=85)
    files["camera"] = folder / "camera.jpg"
    files["camera"].write_bytes(encode(shown, "JPEG", exif=exif_with_jpeg_thumbnail(thumbnail)))
    files["plain"] = folder / "plain.png"
    files["plain"].write_bytes(encode(shown, "PNG"))
    return files


_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"II*", ".tif"),
    (b"RIFF", ".webp"),
)


def _small(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((120, 160)))
