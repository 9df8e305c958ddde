"""`filter.tiling.Copies`: what a detection call searches, without models. A pass at native
resolution searches the image itself, a view included (a turned image); a view's smaller
copies are those of a contiguous copy, made once per image."""

from __future__ import annotations

import numpy as np
import pytest

import filter.tiling
from filter.tiling import Copies, Pass, Tiling, Unit, Window, fine_passes, resized


def _units(image: int, height: int, width: int, overview: float) -> list[Unit]:
    """An overview at `overview` scale (one window) and the finer passes below it."""
    tall, wide = round(height * overview), round(width * overview)
    passes = [Pass(overview, tall, wide, 20.0, None, (Window(0, 0, tall, wide),))]
    passes += fine_passes(height, width, overview, 20.0, Tiling(tile_side=256))
    return [Unit(image, p, search, w) for p, search in enumerate(passes) for w in search.windows]


@pytest.mark.parametrize("native_first", [False, True])
def test_a_views_windows_are_those_of_its_contiguous_copy_and_its_own_pixels_at_scale_1(
    monkeypatch: pytest.MonkeyPatch, native_first: bool
) -> None:
    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, (700, 1100, 3), np.uint8),
        rng.integers(0, 256, (500, 900, 3), np.uint8),
    ]
    views = [np.rot90(images[0], 1), np.rot90(images[1], 3)]
    units = [u for i, v in enumerate(views) for u in _units(i, v.shape[0], v.shape[1], 0.25)]
    if native_first:  # as a batch of images of several sizes may order them
        units.sort(key=lambda u: -u.search.scale)
    scales = sorted({unit.search.scale for unit in units})
    assert scales == [0.25, 0.5, 1.0]
    contiguous = [np.ascontiguousarray(v) for v in views]
    from_copy = Copies(contiguous, units)

    whole_copies: list[tuple[int, ...]] = []
    real = np.ascontiguousarray

    def counting(array: np.ndarray) -> np.ndarray:
        if not array.flags.c_contiguous:
            whole_copies.append(array.shape)
        return real(array)

    monkeypatch.setattr(filter.tiling.np, "ascontiguousarray", counting)
    from_view = Copies(views, units)
    for unit in units:
        window = from_view.window(unit)
        assert np.array_equal(window, from_copy.window(unit))
        if unit.search.scale == 1.0:
            assert np.shares_memory(window, images[unit.image])  # no 2nd copy of the image
        else:
            expected = resized(contiguous[unit.image], unit.search.scale)
            w = unit.window
            rows, cols = slice(w.top, w.top + w.height), slice(w.left, w.left + w.width)
            assert np.array_equal(window, expected[rows, cols])
        from_view.done(unit)
        from_copy.done(unit)
    assert sorted(whole_copies) == sorted(v.shape for v in views)  # once per view
    # Each copy is dropped after its last window.
    assert not from_view._copies and not from_copy._copies
