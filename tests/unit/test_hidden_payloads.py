"""Images hidden in metadata where exiftool, exiv2 or ImageMagick find them (a helper's
review, each extracted byte for byte by one of those tools): every one is a view the
filter checks. Without models: `read_content` gives the views `facegate check` searches."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from filter.content import read_content
from tests.content_probes import (
    Blob,
    Ifd,
    IfdPointer,
    chunk,
    encode,
    load,
    segment,
    tiff,
    with_chunks,
    with_segments,
)

XMP = b"http://ns.adobe.com/xap/1.0/\x00"
EXTENDED_XMP = b"http://ns.adobe.com/xmp/extension/\x00"


@pytest.fixture(scope="module")
def face(identities_dir: Path) -> bytes:
    return encode(load(identities_dir / "id05" / "01.jpg", (96, 96)), "JPEG")


@pytest.fixture(scope="module")
def cover(identities_dir: Path) -> np.ndarray:
    return load(identities_dir / "id02" / "02.jpg", (64, 64))


def _views_holding(data: bytes, face: bytes) -> list[str]:
    """The names of the views whose pixels are the face's (decoded as PIL decodes it)."""
    expected = read_content(face).views[0].pixels
    content = read_content(data)
    assert content.complete, content.unaccounted
    return [v.name for v in content.views if np.array_equal(v.pixels, expected)]


@pytest.mark.parametrize("where", ["IFD0", "EXIF IFD"])
def test_a_jpeg_that_tag_513_points_to_from_any_ifd_is_checked(
    cover: np.ndarray, face: bytes, where: str
) -> None:
    """exiftool extracts it as OtherImage; only IFD1's (the thumbnail) was decoded, and the
    bytes were not scanned either, being image data."""
    pointer = {513: (4, Blob(face, size_tag=514)), 514: (4, [0])}
    if where == "IFD0":
        ifd0 = Ifd({274: (3, [1]), **pointer})
    else:
        ifd0 = Ifd({274: (3, [1]), 34665: (4, IfdPointer(Ifd(pointer)))})
    exif = segment(0xE1, b"Exif\x00\x00" + tiff([ifd0]))
    assert _views_holding(with_segments(encode(cover, "JPEG"), exif), face)


def _xmp(encoded: bytes) -> bytes:
    return segment(
        0xE1, XMP + b"<x:xmpmeta><xmpGImg:image>" + encoded + b"</xmpGImg:image></x:xmpmeta>"
    )


@pytest.mark.parametrize(
    "escape",
    [
        lambda text: text.replace(b"+", b"&#43;").replace(b"/", b"&#47;"),
        lambda text: text.replace(b"+", b"&#x2B;").replace(b"/", b"&#X2f;"),
        lambda text: b"&#9;".join(text[i : i + 60] for i in range(0, len(text), 60)),
        lambda text: b"]]><![CDATA[".join(text[i : i + 50] for i in range(0, len(text), 50)),
    ],
    ids=["decimal", "hexadecimal", "tab", "cdata"],
)
def test_an_xmp_thumbnail_written_with_xml_escapes_is_checked(
    cover: np.ndarray, face: bytes, escape: object
) -> None:
    encoded = base64.b64encode(face)
    assert b"+" in encoded or b"/" in encoded
    escaped = escape(encoded)  # type: ignore[operator]
    data = with_segments(encode(cover, "JPEG"), _xmp(b"<![CDATA[" + escaped + b"]]>"))
    assert _views_holding(data, face) == ["a base64 image in the XMP packet"]


def _extended(
    packet: bytes, parts: list[tuple[int, int]], length: int | None = None
) -> list[bytes]:
    guid = b"0123456789ABCDEF0123456789ABCDEF"
    total = len(packet) if length is None else length
    return [
        segment(0xE1, EXTENDED_XMP + guid + struct.pack(">II", total, start) + packet[start:stop])
        for start, stop in parts
    ]


def test_extended_xmp_is_assembled_by_its_offsets(cover: np.ndarray, face: bytes) -> None:
    """Readers place each part at its offset; joined in file order, a thumbnail split
    inside its base64 start was missed."""
    packet = b"<xmpGImg:image>" + base64.b64encode(face) + b"</xmpGImg:image>"
    cut = packet.index(b"/9j/") + 2
    reversed_parts = _extended(packet, [(cut, len(packet)), (0, cut)])
    data = with_segments(encode(cover, "JPEG"), *reversed_parts)
    assert _views_holding(data, face) == ["a base64 image in the extended XMP packet"]
    # Parts that leave a gap, or disagree on the length, make no packet: unaccounted.
    gap = _extended(packet, [(0, cut), (cut + 1, len(packet))])
    longer = _extended(packet, [(0, cut), (cut, len(packet))], length=len(packet) + 1)
    for parts in (gap, longer):
        content = read_content(with_segments(encode(cover, "JPEG"), *parts))
        assert any("extended XMP" in reason for reason in content.unaccounted)


def _raw_profile(name: bytes, profile: bytes, compressed: bool) -> bytes:
    text = b"\n" + name + b"\n%8d\n" % len(profile)
    hexed = profile.hex().encode()
    text += b"\n".join(hexed[i : i + 72] for i in range(0, len(hexed), 72)) + b"\n"
    keyword = b"Raw profile type " + name + b"\x00"
    if compressed:
        return chunk(b"zTXt", keyword + b"\x00" + zlib.compress(text))
    return chunk(b"tEXt", keyword + text)


@pytest.mark.parametrize("compressed", [False, True])
def test_imagemagick_raw_profiles_in_png_text_are_walked(
    cover: np.ndarray, face: bytes, compressed: bool
) -> None:
    """ImageMagick stores a file's EXIF (thumbnail and all) as hex in a text chunk, and
    writes it back as EXIF when it converts the PNG; exiftool extracts the thumbnail."""
    ifd1 = Ifd({259: (3, [6]), 513: (4, Blob(face, size_tag=514)), 514: (4, [0])})
    exif = b"Exif\x00\x00" + tiff([Ifd({274: (3, [1])}), ifd1])
    png = with_chunks(encode(cover, "PNG"), _raw_profile(b"exif", exif, compressed))
    assert _views_holding(png, face) == ["EXIF thumbnail"]


def test_a_raw_profile_that_does_not_decode_is_unaccounted(cover: np.ndarray) -> None:
    # (PIL reads an "exif" one itself, and refuses it as undecodable: a Photoshop one.)
    broken = chunk(b"tEXt", b"Raw profile type 8bim\x00\n8bim\n      10\nnot hex at all\n")
    content = read_content(with_chunks(encode(cover, "PNG"), broken))
    assert any("cannot decode" in reason for reason in content.unaccounted)
