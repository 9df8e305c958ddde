"""Issue 19, point 1: a file passes only if everything it can show was checked.

Without models: `filter.content` finds every frame, page and thumbnail of the probes (the
hidden image's pixels exactly), names what it cannot account for, and re-encodes only the
checked pixels; `filter.file_check` combines verdicts worst first. The verdicts of
`facegate check` and `facegate batch` on the same probes are in
tests/models/test_content_verdicts.py and tests/loopback/test_batch_ray.py."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filter.content import FileContent, ImageView, checked_pixels_png, read_content
from filter.decide import SEVERITY, ImageVerdict, Reason
from filter.errors import ImageError
from filter.file_check import check_files, file_verdict
from filter.images import ImageLimits, decode_image
from tests.content_probes import (
    UNREADABLE_PLACES,
    chunk,
    encode,
    exif_with_jpeg_thumbnail,
    hiding_places,
    load,
    segment,
    with_chunks,
    with_segments,
)


@pytest.fixture(scope="module")
def shown(identities_dir: Path) -> np.ndarray:
    return load(identities_dir / "id05" / "01.jpg")


@pytest.fixture(scope="module")
def hidden(identities_dir: Path, shown: np.ndarray) -> np.ndarray:
    return load(identities_dir / "id02" / "02.jpg", (shown.shape[1], shown.shape[0]))


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size))


@pytest.mark.parametrize("place", sorted(hiding_places()))
def test_every_hiding_place_is_read_or_named(
    place: str, shown: np.ndarray, hidden: np.ndarray
) -> None:
    data = hiding_places()[place](shown, hidden)
    content = read_content(data)
    # The first view is what every reader shows and what enrolment would see.
    assert np.array_equal(content.views[0].pixels, decode_image(data))
    if place in UNREADABLE_PLACES:
        assert len(content.views) == 1
        assert content.unaccounted and "after the end" in content.unaccounted[0]
        return
    assert content.complete, content.unaccounted
    assert len(content.views) == 2, [v.name for v in content.views]
    found = content.views[1].pixels
    # The hidden image itself (lossless places), or its lossy encoding (a close match).
    candidates = [hidden, _resized(hidden, (120, 160)), _resized(hidden, (96, 128))]
    errors = [
        np.abs(found.astype(int) - c.astype(int)).mean()
        for c in candidates
        if c.shape == found.shape
    ]
    assert errors and min(errors) < 6, (place, errors)


def test_uncompressed_exif_thumbnail_is_the_exact_pixels(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    data = hiding_places()["exif_strip_thumbnail"](shown, hidden)
    content = read_content(data)
    assert content.views[1].name == "EXIF thumbnail"
    assert np.array_equal(content.views[1].pixels, _resized(hidden, (120, 160)))


def test_a_camera_jpeg_is_checked_thumbnail_and_all(shown: np.ndarray) -> None:
    """An EXIF JPEG thumbnail of the picture itself, an ICC profile, XMP text, a comment
    and Adobe's APP14: accounted for, nothing unchecked."""
    thumbnail = encode(_resized(shown, (120, 160)), "JPEG", quality=80)
    xmp = segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>plain text</x:xmpmeta>")
    adobe = segment(0xEE, b"Adobe\x00d\x00\x00\x00\x00\x01")
    data = with_segments(
        encode(shown, "JPEG", quality=90, exif=exif_with_jpeg_thumbnail(thumbnail)),
        xmp,
        adobe,
        segment(0xFE, b"taken on a camera"),
    )
    content = read_content(data)
    assert content.complete, content.unaccounted
    assert [v.name for v in content.views] == ["image", "EXIF thumbnail"]


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda png: with_chunks(png, chunk(b"prVW", b"\x00" * 4000)), "'prVW'"),
        (lambda png: png + b"\x00" * 64, None),  # zero padding after IEND holds nothing
        (lambda png: png + b"\x00\x01", "2 bytes after the end"),
        # After the image data: PIL applies a late tRNS to an APNG's later frames only.
        (lambda png: _before_iend(png, chunk(b"tRNS", bytes(6))), "'tRNS' chunk at byte"),
        (lambda png: _before_iend(png, chunk(b"gAMA", bytes(4))), "after the image data"),
    ],
)
def test_png_chunks_it_does_not_read_are_named(
    shown: np.ndarray, build: object, named: str | None
) -> None:
    content = read_content(build(encode(shown, "PNG")))  # type: ignore[operator]
    if named is None:
        assert content.complete
    else:
        assert any(named in reason for reason in content.unaccounted), content.unaccounted


def _before_iend(png: bytes, *chunks: bytes) -> bytes:
    return png[:-12] + b"".join(chunks) + png[-12:]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (segment(0xE2, b"FPXR\x00" + b"\x01" * 200), "APP2"),  # FlashPix: may hold thumbnails
        (segment(0xE3, b"Meta\x00" + b"\x01" * 200), "APP3"),
        (segment(0xE1, b"SomethingElse\x00" + b"\x01" * 50), "APP1"),
    ],
)
def test_jpeg_segments_it_does_not_read_are_named(
    shown: np.ndarray, extra: bytes, named: str
) -> None:
    content = read_content(with_segments(encode(shown, "JPEG"), extra))
    assert any(named in reason for reason in content.unaccounted), content.unaccounted


def _gif_with(shown: np.ndarray, block: bytes) -> bytes:
    """A GIF with an extension block inserted before its first image."""
    gif = encode(_resized(shown, (32, 32)), "GIF")
    flags = gif[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the colour table
    return gif[:at] + block + gif[at:]


def _riff(webp: bytes, extra: bytes) -> bytes:
    body = webp[12:] + extra
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


@pytest.mark.parametrize(
    ("fmt", "build", "named"),
    [
        ("BMP", lambda d: d, None),
        ("BMP", lambda d: d + b"more pixels", "bytes after the end of the BMP image"),
        ("PPM", lambda d: d, None),
        ("PPM", lambda d: d + d, "bytes after the end of the PPM image"),  # a second image
        ("GIF", lambda d: d + b"GIF89a and more", "bytes after the end of the GIF image"),
        ("WEBP", lambda d: d, None),
        ("WEBP", lambda d: d + b"RIFFmore", "bytes after the end of the WEBP image"),
        ("WEBP", lambda d: _riff(d, b"ZZZZ\x04\x00\x00\x00abcd"), "WebP chunk 'ZZZZ'"),
    ],
)
def test_each_format_ends_where_its_structure_says(
    shown: np.ndarray, fmt: str, build: object, named: str | None
) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = build(encode(_resized(shown, (32, 32)), fmt, **options))  # type: ignore[operator]
    content = read_content(data)
    assert content.format == fmt
    if named is None:
        assert content.complete, content.unaccounted
    else:
        assert any(named in reason for reason in content.unaccounted), content.unaccounted


def test_gif_extensions_are_read_scanned_or_named(shown: np.ndarray) -> None:
    face = encode(_resized(shown, (40, 40)), "PNG")
    comment = b"\x21\xfe" + bytes([len(face[:255])]) + face[:255]  # first sub-block only
    sub_blocks = b"".join(
        bytes([len(face[i : i + 255])]) + face[i : i + 255] for i in range(0, len(face), 255)
    )
    with_image = read_content(_gif_with(shown, b"\x21\xfe" + sub_blocks + b"\x00"))
    assert [v.name for v in with_image.views] == ["image", "an image in a GIF comment"]
    broken = read_content(_gif_with(shown, comment + b"\x00"))  # a PNG cut short
    assert any("cannot be decoded" in r for r in broken.unaccounted)
    unknown = read_content(_gif_with(shown, b"\x21\x77\x03abc\x00"))
    assert any("GIF extension 0x77" in r for r in unknown.unaccounted)
    application = b"\x21\xff\x0b" + b"SOMEAPP01.0" + b"\x02ab\x00"  # not a known one
    named = read_content(_gif_with(shown, application)).unaccounted
    assert any("GIF extension 0xff" in r for r in named)
    looping = b"\x21\xff\x0b" + b"NETSCAPE2.0" + b"\x03\x01\x00\x00\x00"
    assert read_content(_gif_with(shown, looping)).complete


def test_an_embedded_image_that_does_not_decode_is_unaccounted(shown: np.ndarray) -> None:
    broken = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x17" * 300  # a JPEG that breaks off
    data = with_segments(encode(shown, "JPEG"), segment(0xFE, b"look: " + broken))
    content = read_content(data)
    assert any("cannot be decoded" in reason for reason in content.unaccounted)


def test_transparent_pixels_show_their_colour_too(shown: np.ndarray) -> None:
    rgba = Image.fromarray(shown).convert("RGBA")
    rgba.putalpha(0)  # invisible over white, but the colours are all there
    content = read_content(encode_rgba(rgba))
    assert [v.name for v in content.views] == [
        "image",
        "image, colour under its transparent pixels",
        "image, over black",
    ]
    assert (content.views[0].pixels == 255).all()
    assert np.array_equal(content.views[1].pixels, shown)
    assert (content.views[2].pixels == 0).all()
    assert content.frames == 1  # the copy holds what was shown, over white


def encode_rgba(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_more_images_than_a_file_may_hold_are_not_checked(shown: np.ndarray) -> None:
    frames = [_resized(shown, (64, 64)) + i for i in range(6)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    content = read_content(data, ImageLimits(max_images=4))
    assert len(content.views) == 4
    assert any("more images than facegate checks" in r for r in content.unaccounted)
    assert read_content(data).complete


def test_a_payload_stuffed_with_signatures_is_bounded(shown: np.ndarray) -> None:
    stuffed = b"\xff\xd8\xff\xdb" * 2000  # 2000 would-be JPEGs in one comment
    data = with_segments(encode(shown, "JPEG"), segment(0xFE, stuffed))
    content = read_content(data)
    assert any("more than 256 embedded images" in r for r in content.unaccounted)
    assert len(content.views) == 1


def test_a_format_whose_structure_is_not_read_is_unaccounted(shown: np.ndarray) -> None:
    ico = encode(_resized(shown, (64, 64)), "ICO")
    content = read_content(ico)
    assert content.unaccounted and "ICO" in content.unaccounted[0]
    # A file whose first image does not decode is unreadable, as before.
    with pytest.raises(ImageError, match=r"corrupt or truncated|not a recognised"):
        read_content(b"\x89PNG\r\n\x1a\n" + b"nonsense" * 10)


def test_the_copy_is_the_checked_pixels_and_nothing_else(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    """Every place but the trailing ones: a PNG of the first frame, no metadata chunk;
    several frames become an APNG of exactly the checked frames."""
    for place, build in hiding_places().items():
        content = read_content(build(shown, hidden))
        copy = checked_pixels_png(content)
        assert _png_chunks(copy) <= {b"IHDR", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"}, place
        again = Image.open(io.BytesIO(copy))
        frames = []
        for index in range(getattr(again, "n_frames", 1)):
            again.seek(index)
            frames.append(np.asarray(again.convert("RGB")))
        assert len(frames) == content.frames, place
        for frame, view in zip(frames, content.views, strict=False):
            assert np.array_equal(frame, view.pixels), place
        recheck = read_content(copy)
        assert recheck.complete and len(recheck.views) == content.frames, place


def test_a_frame_longer_than_apng_can_say_is_copied_at_its_longest(shown: np.ndarray) -> None:
    frames = [_resized(shown, (32, 32)), _resized(shown, (32, 32))[::-1]]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=70_001)
    content = read_content(webp)
    assert content.durations[0] > 65_535  # more than APNG's 16-bit delay holds
    copy = Image.open(io.BytesIO(checked_pixels_png(content)))
    assert copy.n_frames == 2 and copy.info["duration"] == 65_535


def _png_chunks(data: bytes) -> set[bytes]:
    kinds, pos = set(), 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        kinds.add(kind)
        pos += 12 + length
    return kinds


def _verdict(reason: Reason | None, similarity: float = 0.1) -> ImageVerdict:
    return ImageVerdict(
        passed=reason is None,
        reason=reason,
        faces=0 if reason is Reason.NO_FACE else 1,
        max_similarity=similarity,
        identity="id02" if reason in (Reason.IDENTITY_MATCH, Reason.REPLICA) else None,
    )


def _content(count: int, unaccounted: tuple[str, ...] = ()) -> FileContent:
    pixels = np.zeros((8, 8, 3), np.uint8)
    views = tuple(ImageView(f"view {i}", pixels) for i in range(count))
    return FileContent("PNG", views, 1, unaccounted)


def test_the_file_verdict_is_the_worst_of_its_images_in_the_product_order() -> None:
    # The product-wide order (issue 19); a new reason takes its place in this one tuple.
    assert SEVERITY == (
        Reason.IDENTITY_MATCH,
        Reason.REPLICA,
        Reason.TOO_MANY_FACES,
        Reason.UNCHECKED_CONTENT,
        Reason.UNSUPPORTED_GEOMETRY,
        Reason.FILTER_ERROR,
        Reason.UNREADABLE,
        Reason.NO_FACE,
        None,
    )
    order = list(SEVERITY)
    for better, worse in [(a, b) for a in order for b in order if order.index(b) < order.index(a)]:
        result = file_verdict(_content(2), [_verdict(better), _verdict(worse)])
        assert result.verdict.reason is worse and result.part == "view 1"
    # A tie: the first image (the one every reader shows) speaks for the file.
    tie = file_verdict(_content(2), [_verdict(None, 0.2), _verdict(None, 0.3)])
    assert tie.passed and tie.part is None and tie.verdict.max_similarity == 0.2
    assert tie.images == 2


@pytest.mark.parametrize("first", [None, Reason.NO_FACE, Reason.FILTER_ERROR])
def test_unchecked_content_outranks_every_could_not_check_and_a_pass(
    first: Reason | None,
) -> None:
    result = file_verdict(_content(1, ("3 bytes after the end",)), [_verdict(first)])
    assert result.verdict.reason is Reason.UNCHECKED_CONTENT and not result.passed
    assert result.detail == "3 bytes after the end" and result.verdict.identity is None


def test_a_match_outranks_unchecked_content() -> None:
    result = file_verdict(
        _content(2, ("a chunk",)), [_verdict(None), _verdict(Reason.IDENTITY_MATCH, 0.9)]
    )
    assert result.verdict.reason is Reason.IDENTITY_MATCH and result.part == "view 1"
    assert result.verdict.identity == "id02"


def test_check_files_checks_every_image_of_every_file_in_one_call() -> None:
    calls: list[int] = []

    class Checker:
        def check(self, images: list[np.ndarray]) -> list[ImageVerdict]:
            calls.append(len(images))
            return [_verdict(None)] * 2 + [_verdict(Reason.IDENTITY_MATCH)] + [_verdict(None)]

    results = check_files(Checker(), [_content(2), _content(1), _content(1)])
    assert calls == [4]
    assert [r.verdict.reason for r in results] == [None, Reason.IDENTITY_MATCH, None]


def test_the_verdict_row_is_the_one_check_prints_and_batch_records() -> None:
    """`FileVerdict.row`: the reason as its value, scores unrounded, a NaN (no neighbour
    found) as null, and the file's detail, image count and deciding part."""
    from filter.file_check import FileVerdict

    rejected = FileVerdict(
        ImageVerdict(False, Reason.IDENTITY_MATCH, 2, 0.61, "id02", replica_similarity=0.25),
        3,
        "frame 2",
        None,
    )
    assert rejected.row() == {
        "verdict": "reject",
        "reason": "identity_match",
        "faces": 2,
        "max_similarity": 0.61,
        "identity": "id02",
        "replica_similarity": 0.25,
        "error": None,
        "images": 3,
        "part": "frame 2",
    }
    unsure = FileVerdict(
        ImageVerdict(False, Reason.FILTER_ERROR, 1, float("nan"), None, replica_similarity=None),
        1,
        "image",
        "a face had no finite nearest neighbour",
    )
    row = unsure.row()
    assert row["max_similarity"] is None and row["replica_similarity"] is None
    assert row["reason"] == "filter_error" and row["verdict"] == "reject"
    assert row["error"] == "a face had no finite nearest neighbour"
    passed = FileVerdict(ImageVerdict(True, None, 0, None, None), 1, None, None)
    assert passed.row()["reason"] is None and passed.row()["verdict"] == "pass"
