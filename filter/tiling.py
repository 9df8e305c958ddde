"""Where the detector looks on a large image: native-resolution passes in windows.

MTCNN finds faces of at least `min_face_size` pixels in the image it searches. The
overview pass searches a copy whose long side is at most `max_side` (640): cheap, and
every large face is there, but a face smaller than `min_face_size / scale` at native
size shrinks below MTCNN's minimum and is lost (32 px on a 1,024 px image, 64 px on a
2,048 px one). So an image larger than `max_side` also gets finer passes:

- each pass searches a copy at `band_step` times the resolution of the previous one, up
  to the native image itself (scale 1), so the last pass finds faces down to
  `min_face_size` native pixels;
- each searches only the faces the coarser pass cannot see: from `min_face_size` to
  `band_margin` x (its resolution / the coarser one's) x `min_face_size` in its own
  pixels, i.e. only the first levels of MTCNN's pyramid (the overlap the margin gives
  covers MTCNN's weak recall at the bottom of its range);
- it searches its copy in windows of at most `tile_side` pixels a side, which overlap by
  `tile_overlap` x the largest face it searches. A window keeps a face only if the box
  stays `tile_guard` x that size away from every edge it shares with another window:
  a face cut by an edge is left to the neighbour that holds it whole, and any box of up
  to (`tile_overlap` - 2 `tile_guard`) x the largest face is whole in some window.

A pass's copy is at most the native image and each window a bounded piece of it, so the
work grows with the pixels and the memory of one detection call is bounded by its
windows, whatever the image's size. The scheduling is here too: a `Unit` is one window
of one pass of one image, `batches` cuts units of one shape into calls of bounded
pixels, and `Copies` holds a pass's copy only while its windows are searched. Faces found
by several passes or windows are merged per image (see `filter.faces`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Tiling:
    """The finer passes over images larger than `max_side` (recorded in the manifest)."""

    tile_side: int = 1024  # windows of the finer passes are at most this many pixels a side
    band_step: float = 2.0  # each pass at most this many times the previous one's resolution
    band_margin: float = 1.25  # faces searched beyond what the coarser pass may miss
    tile_overlap: float = 2.0  # windows overlap by this many of the largest face searched
    tile_guard: float = 0.25  # boxes this close (same unit) to a shared edge are dropped

    def __post_init__(self) -> None:
        if self.band_step <= 1 or self.band_margin < 1 or self.tile_side < 64:
            raise ValueError(f"unusable tiling {self}")
        if not 0 <= 2 * self.tile_guard < self.tile_overlap:
            raise ValueError(f"the tile guard must leave room in the overlap: {self}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """A rectangle of a pass's copy, searched as one unit, and the box bounds it keeps
    (in copy pixels; unbounded along the copy's own edges, where boxes may overhang)."""

    top: int
    left: int
    height: int
    width: int
    keep_y: tuple[float, float] = (-math.inf, math.inf)
    keep_x: tuple[float, float] = (-math.inf, math.inf)

    def keeps(self, boxes: np.ndarray) -> np.ndarray:
        """Which boxes (x1, y1, x2, y2, ... in copy pixels) this window vouches for."""
        return (
            (boxes[:, 0] >= self.keep_x[0])
            & (boxes[:, 2] <= self.keep_x[1])
            & (boxes[:, 1] >= self.keep_y[0])
            & (boxes[:, 3] <= self.keep_y[1])
        )


@dataclass(frozen=True)
class Pass:
    """One search of an image: a copy at `scale`, the face sizes searched in it (copy
    pixels; `max_face` None: every size, the overview) and its windows."""

    scale: float
    height: int
    width: int
    min_face: float
    max_face: float | None
    windows: tuple[Window, ...]


def copy_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size `filter.faces` resizes an image to for a pass at `scale`."""
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def fine_passes(
    height: int, width: int, overview_scale: float, min_face: float, tiling: Tiling
) -> list[Pass]:
    """The passes below the overview (none when the overview is at native resolution or
    finer); each searchable, i.e. its copy's short side holds one minimum-size face."""
    passes: list[Pass] = []
    previous = overview_scale
    while previous < 1.0:
        scale = min(1.0, previous * tiling.band_step)
        max_face = min_face * (scale / previous) * tiling.band_margin
        copy_height, copy_width = copy_size(height, width, scale)
        if min(copy_height, copy_width) >= min_face:
            overlap = math.ceil(tiling.tile_overlap * max_face)
            guard = math.ceil(tiling.tile_guard * max_face)
            # A window must leave room for its overlap (only an extreme band_step asks).
            side = max(tiling.tile_side, 2 * (overlap + 1))
            rows = _spans(copy_height, side, overlap)
            cols = _spans(copy_width, side, overlap)
            windows = tuple(
                Window(
                    top,
                    left,
                    tall,
                    wide,
                    keep_y=_bounds(top, tall, copy_height, guard),
                    keep_x=_bounds(left, wide, copy_width, guard),
                )
                for top, tall in rows
                for left, wide in cols
            )
            passes.append(Pass(scale, copy_height, copy_width, min_face, max_face, windows))
        previous = scale
    return passes


def _spans(length: int, side: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of equal windows of at most `side` covering [0, length), each
    overlapping the next by at least `overlap`."""
    if length <= side:
        return [(0, length)]
    count = math.ceil((length - overlap - 1) / (side - overlap - 1))
    size = min(length, math.ceil((length + (count - 1) * (overlap + 1)) / count))
    return [(i * (length - size) // (count - 1), size) for i in range(count)]


def _bounds(start: int, size: int, length: int, guard: int) -> tuple[float, float]:
    low = -math.inf if start == 0 else float(start + guard)
    high = math.inf if start + size >= length else float(start + size - guard)
    return low, high


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    """The image at `scale` (area when shrinking, bilinear when enlarging); the image
    itself, as given, at 1 (see `Copies`)."""
    if scale == 1.0:
        return image
    height, width = copy_size(image.shape[0], image.shape[1], scale)
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


@dataclass(frozen=True)
class Unit:
    """One window of one pass of one image: what a detection call searches."""

    image: int
    index: int  # of the pass, in `detection_passes` order
    search: Pass
    window: Window


class Copies:
    """Each pass's copy of each image, made on first use and dropped after its last
    window, so that only the copies of the windows in flight are held.

    A pass at native resolution searches the image itself, even a view (a turned image,
    see `filter.turned`): each window is copied when its batch is stacked. A view's
    smaller copies are all made at once from one contiguous copy of it, which then goes:
    a 64 MP image is held twice only while they are made, never while it is searched
    (the turned search held a contiguous copy throughout), and is copied once, not once
    a pass (a strided copy of 64 MP takes about half a second)."""

    def __init__(self, images: Sequence[np.ndarray], units: Sequence[Unit]) -> None:
        self._images = images
        self._copies: dict[tuple[int, int], np.ndarray] = {}
        self._left: dict[tuple[int, int], int] = {}
        self._scales: dict[tuple[int, int], float] = {}
        for unit in units:
            key = (unit.image, unit.index)
            self._left[key] = self._left.get(key, 0) + 1
            self._scales[key] = unit.search.scale

    def window(self, unit: Unit) -> np.ndarray:
        key = (unit.image, unit.index)
        if key not in self._copies:
            self._make(unit.image, key)
        w = unit.window
        return self._copies[key][w.top : w.top + w.height, w.left : w.left + w.width]

    def _make(self, image_index: int, key: tuple[int, int]) -> None:
        image = self._images[image_index]
        if self._scales[key] == 1.0 or image.flags.c_contiguous:
            self._copies[key] = resized(image, self._scales[key])
            return
        whole = np.ascontiguousarray(image)
        for other, scale in self._scales.items():
            pending = other not in self._copies and self._left[other] > 0
            if other[0] == image_index and scale != 1.0 and pending:
                self._copies[other] = resized(whole, scale)

    def done(self, unit: Unit) -> None:
        key = (unit.image, unit.index)
        self._left[key] -= 1
        if self._left[key] == 0:
            self._copies.pop(key, None)


def batches(units: list[Unit], pixels_each: int, budget: int) -> list[list[Unit]]:
    """Consecutive runs of units (a copy's windows stay together) of at most `budget`
    pixels, at least one unit each."""
    per_call = max(1, budget // max(1, pixels_each))
    return [units[i : i + per_call] for i in range(0, len(units), per_call)]
