"""A face a viewer shows must be a face the filter checks, whatever the file's alpha
channel or colour profile does (filter/colour_views.py, filter/images.py `frame_views`).
Without models: `read_content` gives the view a viewer shows; the verdicts of `facegate
check` on the same probes are in tests/models/test_content_verdicts.py."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from filter.colour_views import VISIBLE_DIFFERENCE
from filter.content import read_content
from tests.colour_probes import (
    alpha_drawn,
    dark_with_gamma,
    icc_stretched,
    in_band,
    png_with_chunks_before_idat,
    raw_png,
    side_by_side,
    stretching_icc_profile,
)
from tests.content_probes import encode, load


@pytest.fixture(scope="module")
def shown(identities_dir: Path) -> np.ndarray:
    return load(identities_dir / "id05" / "01.jpg", (160, 160))


@pytest.fixture(scope="module")
def hidden(identities_dir: Path) -> np.ndarray:
    return load(identities_dir / "id02" / "02.jpg", (160, 160))


def _right_half(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, pixels.shape[1] // 2 :].astype(np.float64)


def _mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_a_face_drawn_in_the_alpha_channel_is_seen_over_black(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    content = read_content(alpha_drawn(shown, hidden))
    views = {v.name: v.pixels for v in content.views}
    assert set(views) == {
        "image",
        "image, colour under its transparent pixels",
        "image, over black",
    }
    assert (_right_half(views["image"]) == 255).all()  # over white: blank
    assert (_right_half(views["image, colour under its transparent pixels"]) == 255).all()
    grey = np.asarray(Image.fromarray(hidden).convert("L"))
    over_black = _right_half(views["image, over black"])
    assert _mean_error(over_black[..., 0], grey) <= 1.0
    assert content.complete


def test_a_transparent_colour_in_an_rgb_png_is_transparent(shown: np.ndarray) -> None:
    pixels = shown.copy()
    pixels[:40] = (10, 20, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", transparency=(10, 20, 30))
    views = {v.name: v.pixels for v in read_content(buffer.getvalue()).views}
    assert (views["image"][:40] == 255).all()  # a viewer shows the page through it
    assert (views["image, over black"][:40] == 0).all()
    assert np.array_equal(views["image, colour under its transparent pixels"], pixels)


@pytest.mark.parametrize("bits", [2, 4])
def test_a_transparent_grey_level_below_8_bits_is_transparent(
    hidden: np.ndarray, bits: int
) -> None:
    # PIL scales the samples to 8 bits but not the tRNS level: without the fix, the face
    # drawn in the transparent level was checked as opaque grey only.
    top = (1 << bits) - 1
    grey = np.asarray(Image.fromarray(hidden).convert("L")).astype(np.int64)
    samples = np.where(grey > 100, 1, 0)  # the face's light parts in the transparent level
    samples[:, :20] = top
    views = {v.name: v.pixels for v in read_content(raw_png(samples, bits, (1,))).views}
    transparent = samples == 1
    assert (views["image"][transparent] == 255).all()  # the page shows through
    assert (views["image, over black"][transparent] == 0).all()
    assert (views["image, over black"][samples == top] == 255).all()
    under = views["image, colour under its transparent pixels"]
    assert (under[transparent] == 255 // top).all()  # the level as PIL scales it


def test_a_transparent_16_bit_grey_level_is_matched_before_scaling(shown: np.ndarray) -> None:
    samples = np.full((8, 8), 1001, np.int64)
    samples[:4] = 1000  # one step from its neighbours: the same once scaled to 8 bits
    samples[-1, 0], samples[-1, -1] = 0, 65535  # the range the samples are scaled over
    views = {v.name: v.pixels for v in read_content(raw_png(samples, 16, (1000,))).views}
    assert (views["image"][:4] == 255).all() and (views["image"][4:-1] < 255).all()
    assert (views["image, over black"][:4] == 0).all()


def test_a_transparent_16_bit_colour_is_unaccounted(shown: np.ndarray) -> None:
    samples = np.full((8, 8, 3), 1001, np.int64)
    samples[:4] = 1000  # 8 bits a channel cannot tell these rows apart
    content = read_content(raw_png(samples, 16, (1000, 1000, 1000)))
    assert not content.complete
    assert any("transparent colour in 16 bits" in reason for reason in content.unaccounted)
    # Not matched wrongly either: the 16-bit level compared with 8-bit pixels.
    assert {v.name for v in content.views} == {"image"}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_a_face_an_icc_profile_stretches_out_of_a_narrow_band_is_seen_as_managed(
    shown: np.ndarray, hidden: np.ndarray, fmt: str
) -> None:
    content = read_content(icc_stretched(shown, hidden, fmt))
    views = {v.name: v.pixels for v in content.views}
    assert list(views) == ["image", "image, as its ICC profile shows it"]
    raw = _right_half(views["image"])
    assert raw.max() - raw.min() <= 24  # a grey panel to a decoder
    managed = _right_half(views["image, as its ICC profile shows it"])
    assert _mean_error(managed, hidden) < 20.0 < _mean_error(raw, hidden)
    assert content.complete


def test_a_face_png_gamma_brightens_is_seen_as_managed(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    content = read_content(dark_with_gamma(shown, hidden))
    views = {v.name: v.pixels for v in content.views}
    assert list(views) == ["image", "image, as its PNG gamma and chromaticities show it"]
    managed = _right_half(views["image, as its PNG gamma and chromaticities show it"])
    raw = _right_half(views["image"])
    assert _mean_error(managed, hidden) < 12.0 < _mean_error(raw, hidden)


def test_png_chromaticities_that_mix_the_channels_are_applied(shown: np.ndarray) -> None:
    # Red and green primaries swapped: a viewer shows the red channel as green.
    swapped = struct.pack(">8I", 31270, 32900, 30000, 60000, 64000, 33000, 15000, 6000)
    data = png_with_chunks_before_idat(
        encode(shown, "PNG"), (b"gAMA", struct.pack(">I", 45455)), (b"cHRM", swapped)
    )
    views = {v.name: v.pixels for v in read_content(data).views}
    managed = views["image, as its PNG gamma and chromaticities show it"]
    assert _mean_error(managed[..., 1], shown[..., 0]) < _mean_error(managed[..., 1], shown[..., 1])


def test_srgb_profiles_and_plain_gamma_add_no_view(shown: np.ndarray) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    files = {
        "icc": encode(shown, "JPEG", icc_profile=srgb),
        "gamma": png_with_chunks_before_idat(
            encode(shown, "PNG"), (b"gAMA", struct.pack(">I", 45455))
        ),
        "srgb over gamma": png_with_chunks_before_idat(
            encode(shown, "PNG"), (b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 100000))
        ),
    }
    for name, data in files.items():
        content = read_content(data)
        assert [v.name for v in content.views] == ["image"], name
        assert content.complete, name


def test_a_profile_facegate_cannot_apply_is_unaccounted(shown: np.ndarray) -> None:
    broken = encode(shown, "PNG", icc_profile=b"not an ICC profile at all" * 8)
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    mismatched = encode(shown, "JPEG", icc_profile=lab)  # Lab colour on RGB pixels
    for data, words in ((broken, "cannot read"), (mismatched, "does not apply")):
        content = read_content(data)
        assert not content.complete
        assert any(words in reason for reason in content.unaccounted), content.unaccounted


def test_the_managed_view_is_skipped_only_below_a_visible_difference(shown: np.ndarray) -> None:
    # A gamma a little off 1/2.2 moves some values by more than VISIBLE_DIFFERENCE: checked.
    data = png_with_chunks_before_idat(
        encode(side_by_side(shown, shown), "PNG"), (b"gAMA", struct.pack(">I", 40000))
    )
    views = read_content(data).views
    assert len(views) == 2
    moved = np.abs(views[1].pixels.astype(int) - views[0].pixels.astype(int)).max()
    assert moved > VISIBLE_DIFFERENCE


def test_a_png_cicp_other_than_srgb_is_unaccounted(shown: np.ndarray) -> None:
    png = encode(shown, "PNG")
    pq = png_with_chunks_before_idat(png, (b"cICP", bytes((9, 16, 0, 1))))  # BT.2100 PQ
    content = read_content(pq)
    assert any("cICP" in reason and "sRGB" in reason for reason in content.unaccounted)
    srgb = png_with_chunks_before_idat(png, (b"cICP", bytes((1, 13, 0, 1))))
    assert read_content(srgb).complete


def test_colours_are_managed_before_transparency_is_composited(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    """Viewers manage the colour, then blend it: a face squeezed into the band under 78 %
    opacity is washed out of the band once blended over white, so managing the blended
    frame would show a flat panel."""
    band = side_by_side(shown, in_band(hidden))
    alpha = np.full(band.shape[:2], 255, np.uint8)
    alpha[:, shown.shape[1] :] = 200
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([band, alpha]), "RGBA").save(
        buffer, "PNG", icc_profile=stretching_icc_profile()
    )
    views = {v.name: v.pixels for v in read_content(buffer.getvalue()).views}
    managed = _right_half(views["image, as its ICC profile shows it"])
    blended = 255.0 - (255.0 - hidden.astype(np.float64)) * 200 / 255  # the face over white
    assert _mean_error(managed, blended) < 15.0
    under = _right_half(
        views["image, as its ICC profile shows it, colour under its transparent pixels"]
    )
    assert _mean_error(under, hidden) < 20.0


def test_a_16_bit_greyscale_frame_keeps_its_profile(shown: np.ndarray, hidden: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(side_by_side(shown, in_band(hidden))).convert("L"))
    deep = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    buffer = io.BytesIO()
    deep.save(buffer, "PNG", icc_profile=stretching_icc_profile(grey=True))
    views = {v.name: v.pixels for v in read_content(buffer.getvalue()).views}
    assert "image, as its ICC profile shows it" in views
    managed = _right_half(views["image, as its ICC profile shows it"])[..., 0]
    assert managed.max() - managed.min() > 200  # the band stretched to full range


def test_jpeg_icc_segments_that_do_not_make_one_profile_are_unaccounted(
    shown: np.ndarray, hidden: np.ndarray
) -> None:
    """Pillow drops the whole profile when a segment is too short to be numbered; libjpeg
    and browsers skip that segment and apply the rest."""
    jpeg = icc_stretched(shown, hidden, "JPEG")
    short = jpeg[:2] + b"\xff\xe2\x00\x0fICC_PROFILE\x00\xff" + jpeg[2:]
    content = read_content(short)
    assert any("ICC profile segments" in reason for reason in content.unaccounted)
    assert read_content(jpeg).complete
