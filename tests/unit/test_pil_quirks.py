"""Where PIL decodes a frame other than viewers show it (filter/pil_quirks.py): each probe
holds a face a viewer shows and PIL's own decoding hides, and each view is asserted to
show it. Without models: `read_content` gives the views `facegate check` searches."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from filter.content import read_content
from tests.colour_probes import raw_png, stretching_icc_profile

EXTRA_SAMPLES = 338


def _views(data: bytes) -> dict[str, np.ndarray]:
    return {view.name: view.pixels for view in read_content(data).views}


def _tiff_with_extra_samples(rgba: np.ndarray, meaning: int, compression: str | None) -> bytes:
    """An RGBA TIFF as PIL writes it, its ExtraSamples tag then set to `meaning` (PIL
    writes 2, unassociated, whatever it is told): 1 associated, 0 unspecified."""
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "TIFF", compression=compression)
    return _patched_extra_samples(buffer.getvalue(), meaning)


def _patched_extra_samples(tiff: bytes, meaning: int) -> bytes:
    data = bytearray(tiff)
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == EXTRA_SAMPLES:
            struct.pack_into("<H", data, at + 8, meaning)
            return bytes(data)
    raise AssertionError("PIL wrote no ExtraSamples tag")


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])  # PIL's decoder, then libtiff's
def test_associated_alpha_keeps_the_colour_stored_under_transparent_pixels(
    compression: str | None,
) -> None:
    """PIL un-premultiplies associated alpha, so the colour stored where alpha is 0 became
    black in every view; a program that drops the alpha channel shows it, and so does a
    premultiplied composite over black (C + (1 - a) * 0)."""
    stored = np.zeros((32, 32, 4), np.uint8)
    stored[8:24, 8:24, :3] = 200  # the colour; alpha 0 everywhere
    views = _views(_tiff_with_extra_samples(stored, 1, compression))
    assert (views["image"] == 255).all()  # over white: C + 255, saturated
    for name in ("image, colour under its transparent pixels", "image, over black"):
        assert (views[name][8:24, 8:24] == 200).all() and (views[name][:8] == 0).all()


def test_associated_alpha_composites_as_premultiplied() -> None:
    stored = np.zeros((16, 16, 4), np.uint8)
    stored[..., 3] = 128
    stored[..., :3] = 64  # half a 128 grey, premultiplied by alpha 128
    views = _views(_tiff_with_extra_samples(stored, 1, None))
    assert (views["image"] == 64 + 127).all()  # C + (255 - a): not un-premultiplied first
    assert (views["image, over black"] == 64).all()


def test_16_bit_associated_alpha_keeps_the_colour_stored_under_transparent_pixels() -> None:
    stored = np.zeros((16, 16, 4), np.uint16)
    stored[4:12, 4:12, :3] = 200 * 257  # the colour; alpha 0 everywhere
    data = _tiff_with_extra_samples_16(stored)
    assert Image.open(io.BytesIO(data)).tile[0].args[0].startswith("RGBa;16")
    under = _views(data)["image, colour under its transparent pixels"]
    assert (under[4:12, 4:12] == 200).all() and (under[:4] == 0).all()


def _tiff_with_extra_samples_16(samples: np.ndarray) -> bytes:
    """A 16-bit RGBA TIFF with associated alpha, written tag by tag (PIL writes no
    16-bit RGBA)."""
    height, width = samples.shape[:2]
    pixels = samples.astype("<u2").tobytes()
    tags = [  # (tag, type, count, value or offset)
        (256, 3, 1, width), (257, 3, 1, height), (258, 3, 4, 0), (259, 3, 1, 1),
        (262, 3, 1, 2), (273, 4, 1, 0), (277, 3, 1, 4), (278, 3, 1, height),
        (279, 4, 1, len(pixels)), (284, 3, 1, 1), (EXTRA_SAMPLES, 3, 1, 1),
    ]  # fmt: skip
    ifd_size = 2 + 12 * len(tags) + 4
    bits_at = 8 + ifd_size
    pixels_at = bits_at + 8
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, kind, count, value in tags:
        value = bits_at if tag == 258 else pixels_at if tag == 273 else value
        packed = struct.pack("<H", value) + bytes(2) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += bytes(4) + struct.pack("<4H", 16, 16, 16, 16) + pixels
    return bytes(out)


def test_a_colour_profile_is_applied_to_premultiplied_colour_as_viewers_do() -> None:
    """Viewers un-premultiply, manage the colour, then composite: a face kept in a narrow
    band under partial alpha is stretched to full contrast (it was managed as stored)."""
    band = np.full((16, 16), 120, np.uint8)
    band[4:12, 4:12] = 136
    stored = np.zeros((16, 16, 4), np.uint8)
    stored[..., 3] = 128
    stored[..., :3] = (band.astype(np.int32) * 128 // 255)[..., None]  # premultiplied
    buffer = io.BytesIO()
    Image.fromarray(stored, "RGBA").save(buffer, "TIFF", icc_profile=stretching_icc_profile())
    data = _patched_extra_samples(buffer.getvalue(), 1)
    managed = _views(data)["image, as its ICC profile shows it"][..., 0].astype(int)
    assert managed[4:12, 4:12].mean() - managed[:4].mean() > 60


def test_an_extra_sample_of_unspecified_meaning_is_unaccounted() -> None:
    """ExtraSamples 0: PIL drops the sample, libtiff's RGBA reader takes it as alpha."""
    stored = np.zeros((16, 16, 4), np.uint8)
    stored[4:12, 4:12, 3] = 255
    content = read_content(_tiff_with_extra_samples(stored, 0, None))
    assert not content.complete
    assert any("ExtraSamples 0" in reason for reason in content.unaccounted)


def _float_tiff(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(samples.astype(np.float32), "F").save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("poison", [np.nan, np.inf, 1e30])
def test_float_samples_with_one_bad_pixel_still_show_the_picture(poison: float) -> None:
    samples = np.zeros((16, 16), np.float64)
    samples[4:12, 4:12] = 1.0  # the picture, in 0..1
    samples[0, 0] = poison
    views = _views(_float_tiff(samples))
    clamped = views["image, float samples clamped to 0..1"][..., 0]
    assert (clamped[4:12, 4:12] == 255).all() and (clamped[1:4] == 0).all()
    if np.isfinite(poison):
        return  # a far outlier crushes the scaled view, as viewers that scale would
    shown = views["image"][..., 0]  # scaled over the finite samples: no NaN everywhere
    assert (shown[4:12, 4:12] == 255).all() and (shown[1:4] == 0).all()


def test_float_samples_within_0_to_1_add_no_clamped_view() -> None:
    samples = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    assert set(_views(_float_tiff(samples))) == {"image"}


def test_palette_indices_past_the_plte_are_also_checked_as_chrome_shows_them() -> None:
    """PIL and libpng show an index past PLTE's end as black; Skia pads the table with its
    last colour, so a face drawn in such an index is white on black in Chrome."""
    indices = np.zeros((16, 16), np.uint8)
    indices[4:12, 4:12] = 2  # past the two-entry palette
    png = _paletted(indices, bytes([0, 0, 0, 255, 255, 255]))
    views = _views(png)
    assert (views["image"] == 0).all()  # black, as PIL decodes it
    padded = views["image, palette padded with its last colour"]
    assert (padded[4:12, 4:12] == 255).all() and (padded[:4] == 0).all()
    # Indices within the palette add no view.
    assert set(_views(_paletted(np.minimum(indices, 1), bytes(6)))) == {"image"}


def _paletted(indices: np.ndarray, plte: bytes) -> bytes:
    return raw_png(indices, 8, palette=plte)


def test_16_bit_grey_probe_is_still_matched_exactly() -> None:
    """The tRNS rules moved here from filter/images.py: the 16-bit grey case still holds."""
    samples = np.full((8, 8), 1001, np.int64)
    samples[:4] = 1000
    samples[-1, 0], samples[-1, -1] = 0, 65535
    views = _views(raw_png(samples, 16, (1000,)))
    assert (views["image"][:4] == 255).all() and (views["image"][4:-1] < 255).all()
