"""Bytes the container walkers once accepted without reading them (each could carry a whole
image of an enrolled face while the file passed), and a scan that cost a copy of the
payload per signature. Without models: `read_content` either finds the hidden image as a
view or names the bytes in `unaccounted`; the same files built correctly stay complete."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from filter import content_scan
from filter.content import MAX_EMBEDDED, read_content
from filter.content_scan import Layout, scan
from tests.content_probes import chunk, encode, load, segment, with_chunks, with_segments


@pytest.fixture(scope="module")
def shown(identities_dir: Path) -> np.ndarray:
    return np.asarray(Image.fromarray(load(identities_dir / "id05" / "01.jpg")).resize((96, 96)))


@pytest.fixture(scope="module")
def hidden(identities_dir: Path) -> np.ndarray:
    return np.asarray(Image.fromarray(load(identities_dir / "id02" / "02.jpg")).resize((80, 80)))


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(png):
        length, kind = struct.unpack_from(">I4s", png, pos)
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _png(parts: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in parts)


def _idat(png: bytes) -> bytes:
    return b"".join(body for kind, body in _chunks(png) if kind == b"IDAT")


def _named(data: bytes, words: str) -> None:
    content = read_content(data)
    assert any(words in reason for reason in content.unaccounted), content.unaccounted


# 3. The scan's cost ------------------------------------------------------------------


def test_a_stuffed_payload_is_bounded_without_a_copy_per_signature() -> None:
    hits = content_scan.MAX_HITS
    assert hits == MAX_EMBEDDED  # a payload asks no more than a file may try
    payload = b"GIF89a" * 400 + b"\x00" * (256 * 1024)
    layout = Layout()
    tracemalloc.start()
    scan(payload, "a test payload", layout)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(layout.embedded) <= hits
    assert any(f"more than {hits} embedded images" in r for r in layout.unaccounted)
    assert peak < 8 * 1024 * 1024, peak  # one copy of the rest per hit was ~100 MB


def test_a_png_stuffed_with_signatures_is_rejected_cheaply() -> None:
    png = encode(np.full((16, 16, 3), 128, np.uint8), "PNG")
    stuffed = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"GIF89a" * 20000, 9))
    tracemalloc.start()
    content = read_content(with_chunks(png, stuffed))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert any("more than 256 embedded images in the PNG" in r for r in content.unaccounted)
    assert peak < 64 * 1024 * 1024, peak


# 4. PNG ------------------------------------------------------------------------------


def test_iend_with_a_body_is_unaccounted(shown: np.ndarray, hidden: np.ndarray) -> None:
    png = encode(shown, "PNG")
    assert read_content(png).complete
    hid = encode(hidden, "PNG")
    _named(png[:-12] + chunk(b"IEND", hid), f"IEND with a {len(hid)}-byte body")


def test_idat_data_after_the_compressed_stream_is_unaccounted(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    png, hid = encode(shown, "PNG"), encode(hidden, "PNG")
    parts = [(k, b) for k, b in _chunks(png) if k not in (b"IDAT", b"IEND")]
    split = _idat(png)
    # The same stream over two IDAT chunks is fine.
    two = _png([*parts, (b"IDAT", split[:100]), (b"IDAT", split[100:]), (b"IEND", b"")])
    assert read_content(two).complete
    later = _png([*parts, (b"IDAT", split), (b"IDAT", hid), (b"IEND", b"")])
    _named(later, "bytes after IDAT's compressed stream")
    inside = _png([*parts, (b"IDAT", split + hid), (b"IEND", b"")])
    _named(inside, f"{len(hid)} bytes after IDAT's compressed stream")


def test_idat_inflating_past_the_rows_is_unaccounted(shown: np.ndarray, hidden: np.ndarray) -> None:
    png = encode(shown, "PNG")
    parts = [(k, b) for k, b in _chunks(png) if k not in (b"IDAT", b"IEND")]
    rows = zlib.decompress(_idat(png))
    longer = zlib.compress(rows + encode(hidden, "PNG"))  # a decoder stops at the rows
    _named(_png([*parts, (b"IDAT", longer), (b"IEND", b"")]), "inflates past its rows")


def _fctl(sequence: int, width: int, height: int) -> bytes:
    return struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0)


def test_apng_frames_the_decoder_does_not_show_are_unaccounted(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    png = encode(shown, "PNG")
    frame = _idat(encode(hidden[:96, :80], "PNG"))
    height, width = 80, 80
    ihdr, rest = png[:33], png[33:-12]
    second = chunk(b"fcTL", _fctl(1, width, height)) + chunk(b"fdAT", b"\x00\x00\x00\x02" + frame)
    first = chunk(b"fcTL", _fctl(0, 96, 96))
    two = ihdr + chunk(b"acTL", struct.pack(">II", 2, 0)) + first + rest + second + png[-12:]
    content = read_content(two)
    assert content.complete and content.frames == 2, content.unaccounted
    alone = chunk(b"fcTL", _fctl(0, width, height)) + chunk(b"fdAT", b"\x00\x00\x00\x01" + frame)
    no_actl = png[:-12] + alone + png[-12:]
    _named(no_actl, "without a valid acTL before IDAT")
    one = ihdr + chunk(b"acTL", struct.pack(">II", 1, 0)) + first + rest + second + png[-12:]
    _named(one, "beyond the 1 frames acTL announces")


@pytest.mark.parametrize(
    ("kind", "right"),
    [
        (b"tIME", b"\x07\xe8\x01\x02\x03\x04\x05"),
        (b"gAMA", struct.pack(">I", 45455)),
        (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)),
        (b"pHYs", b"\x00\x00\x0b\x13\x00\x00\x0b\x13\x01"),
        (b"cICP", b"\x01\x0d\x00\x01"),
        (b"bKGD", b"\x00\x01" * 3),  # RGB: three 16-bit samples
        (b"sBIT", b"\x08\x08\x08"),
        (b"sRGB", b"\x00"),
    ],
)
def test_fixed_size_png_chunks_hold_exactly_their_fields(
    shown: np.ndarray, hidden: np.ndarray, kind: bytes, right: bytes
) -> None:
    png = encode(shown, "PNG")
    assert read_content(with_chunks(png, chunk(kind, right))).complete
    stuffed = with_chunks(png, chunk(kind, right + encode(hidden, "PNG")))
    _named(stuffed, f"the PNG {kind.decode()!r} chunk at byte 33 holds")


def test_hist_needs_a_palette_and_its_size(shown: np.ndarray, hidden: np.ndarray) -> None:
    _named(with_chunks(encode(shown, "PNG"), chunk(b"hIST", encode(hidden, "PNG"))), "'hIST'")
    buffer = io.BytesIO()
    Image.fromarray(shown).quantize(16).save(buffer, "PNG")
    palette = buffer.getvalue()
    at = palette.index(b"IDAT") - 4
    right = palette[:at] + chunk(b"hIST", b"\x00\x01" * 16) + palette[at:]
    assert read_content(right).complete
    wrong = palette[:at] + chunk(b"hIST", b"\x00\x01" * 16 + encode(hidden, "PNG")) + palette[at:]
    _named(wrong, "'hIST' chunk")


@pytest.mark.parametrize(("kind", "head"), [(b"sPLT", b"x\x00\x08"), (b"pCAL", b"c\x00")])
def test_variable_png_chunks_are_scanned(
    shown: np.ndarray, hidden: np.ndarray, kind: bytes, head: bytes
) -> None:
    content = read_content(
        with_chunks(encode(shown, "PNG"), chunk(kind, head + encode(hidden, "PNG")))
    )
    assert [v.name for v in content.views] == [
        "image",
        f"an image in the PNG {kind.decode()!r} chunk",
    ]
    assert np.array_equal(content.views[1].pixels, hidden)


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP", b"iTXt"])
def test_bytes_after_a_compressed_text_are_unaccounted(
    shown: np.ndarray, hidden: np.ndarray, kind: bytes
) -> None:
    head = b"Comment\x00\x01\x00\x00\x00" if kind == b"iTXt" else b"Comment\x00\x00"
    text = _SRGB if kind == b"iCCP" else b"hello"
    png = encode(shown, "PNG")
    assert read_content(with_chunks(png, chunk(kind, head + zlib.compress(text)))).complete
    stuffed = chunk(kind, head + zlib.compress(text) + encode(hidden, "PNG"))
    _named(with_chunks(png, stuffed), f"after the PNG {kind.decode()!r} chunk's compressed stream")


def test_an_itxt_translated_keyword_is_scanned(shown: np.ndarray, hidden: np.ndarray) -> None:
    encoded = base64.b64encode(encode(hidden, "PNG"))
    body = b"Title\x00\x01\x00en\x00" + encoded + b"\x00" + zlib.compress(b"plain")
    content = read_content(with_chunks(encode(shown, "PNG"), chunk(b"iTXt", body)))
    assert len(content.views) == 2 or content.unaccounted, "the keyword went unread"


# 4. JPEG -----------------------------------------------------------------------------


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    return encode(pixels, "JPEG", quality=quality)


def test_a_dnl_segment_holds_two_bytes(shown: np.ndarray, hidden: np.ndarray) -> None:
    _named(with_segments(_jpeg(shown), segment(0xDC, _jpeg(hidden))), "DNL segment")


def test_the_adobe_segment_is_scanned_past_its_fields(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    adobe = b"Adobe\x00\x64\x00\x00\x00\x00\x01"
    assert read_content(with_segments(_jpeg(shown), segment(0xEE, adobe))).complete
    content = read_content(with_segments(_jpeg(shown), segment(0xEE, adobe + _jpeg(hidden))))
    assert [v.name for v in content.views] == ["image", "an image in the JPEG APP14 Adobe segment"]


def test_an_image_inside_entropy_coded_data_is_found(
    shown: np.ndarray, hidden: np.ndarray, identities_dir: Path
) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.minimum(hidden, 254)).save(buffer, "BMP")  # no 0xFF: no marker
    bmp = buffer.getvalue()
    jpeg = _jpeg(shown)
    content = read_content(jpeg[:-2] + bmp + b"\xff\xd9")
    assert len(content.views) == 2, content.unaccounted
    assert content.views[1].name.startswith("an image in the JPEG scan data")
    assert np.array_equal(content.views[1].pixels, np.minimum(hidden, 254))
    # Photos' own scan data holds no image signature: they stay complete.
    for path in sorted(identities_dir.parent.rglob("*.jpg")):
        assert read_content(path.read_bytes()).complete, path


def _mpo_with_mpf_extra(shown: np.ndarray, extra: bytes) -> bytes:
    """A two-image MPO whose second image carries an MPF attribute segment (PIL writes
    none) ending with `extra`; the first image's MP entry grows to cover it."""
    mpo = encode(shown, "MPO", save_all=True, append_images=[shown])
    header = mpo.index(b"MPF\x00") + 4
    (ifd,) = struct.unpack_from("<I", mpo, header + 4)
    (entries,) = struct.unpack_from("<H", mpo, header + ifd)
    for i in range(entries):
        tag, _kind, _number, value = struct.unpack_from("<HHII", mpo, header + ifd + 2 + 12 * i)
        if tag == 0xB002:
            break
    size_at = header + value + 16 + 4  # the second entry's size, then its offset
    size, offset = struct.unpack_from("<II", mpo, size_at)
    version = struct.pack("<HHI4s", 0xB000, 7, 4, b"0100")
    attributes = b"II*\x00" + struct.pack("<IH", 8, 1) + version + b"\x00" * 4
    mpf = segment(0xE2, b"MPF\x00" + attributes + extra)
    second = header + offset
    out = bytearray(mpo[: second + 2] + mpf + mpo[second + 2 :])
    struct.pack_into("<I", out, size_at, size + len(mpf))
    return bytes(out)


def test_a_later_mpo_images_mpf_segment_is_read(shown: np.ndarray, hidden: np.ndarray) -> None:
    plain = read_content(_mpo_with_mpf_extra(shown, b""))
    assert plain.complete and len(plain.views) == 2, plain.unaccounted
    content = read_content(_mpo_with_mpf_extra(shown, encode(hidden, "PNG")))
    found = {v.name: v.pixels for v in content.views}
    assert "an image in the MPF segment" in found, (list(found), content.unaccounted)
    assert np.array_equal(found["an image in the MPF segment"], hidden)


# 4. Base64 ---------------------------------------------------------------------------


def test_base64_images_of_every_decoded_format_are_found(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    for fmt in ("BMP", "PNG", "JPEG", "GIF", "WEBP", "TIFF"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        text = b"data:image/x;base64," + base64.b64encode(encode(hidden, fmt, **options))
        body = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + text
        content = read_content(with_chunks(encode(shown, "PNG"), chunk(b"iTXt", body)))
        names = [v.name for v in content.views]
        assert names == ["image", "a base64 image in the PNG 'iTXt' chunk"], (fmt, names)
