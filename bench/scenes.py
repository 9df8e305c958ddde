"""Test scenes built from the test photos: large canvases with a small face, crowds, and
an image at the decoder's limit. Shared by the resolution benchmark and the tests.

- `composite`: the issue's probe. A canvas of `side` pixels holding a stranger's photo at
  half its width (a large face) and, optionally, a member's photo scaled to `small_width`
  pixels wide (its face about half that), in the opposite corner.
- `crowd`: a canvas tiled with copies of one face crop, `cell` pixels each: 640 px of
  32 px cells is the hostile image of issue 18 (about 400 faces).
- `large_canvas`: a smooth `side` x `side` canvas (cheap to encode and to detect on) with a
  member's photo scaled to `small_width`, far from the corner, for the decoder's limit.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from filter.images import decode_image

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "data" / "faces" / "identities"
STRANGER = FACES / "id07" / "01.jpg"  # id07 is never enrolled in these scenes
MEMBER = FACES / "id01" / "08.jpg"  # held out: the index has id01's other photos


def scaled(image: np.ndarray, width: int) -> np.ndarray:
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    interpolation = cv2.INTER_AREA if width < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def composite(
    side: int,
    small_width: int | None,
    stranger: Path = STRANGER,
    member: Path = MEMBER,
    background: int = 180,
) -> np.ndarray:
    canvas = np.full((side, side, 3), background, np.uint8)
    big = scaled(decode_image(stranger), side // 2)
    canvas[: big.shape[0], : big.shape[1]] = big
    if small_width:
        small = scaled(decode_image(member), small_width)
        margin = side // 10
        top, left = side - margin - small.shape[0], side - margin - small.shape[1]
        canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


def face_crop(photo: Path, box: tuple[float, float, float, float]) -> np.ndarray:
    """The square around a face box (x1, y1, x2, y2), 20 % larger, inside the photo."""
    image = decode_image(photo)
    x1, y1, x2, y2 = box
    side = 1.2 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(max(0, cx - side / 2))
    top = int(max(0, cy - side / 2))
    right = int(min(image.shape[1], cx + side / 2))
    bottom = int(min(image.shape[0], cy + side / 2))
    return np.ascontiguousarray(image[top:bottom, left:right])


def crowd(face: np.ndarray, side: int = 640, cell: int = 32) -> np.ndarray:
    tile = cv2.resize(face, (cell, cell), interpolation=cv2.INTER_AREA)
    count = -(-side // cell)
    return np.ascontiguousarray(np.tile(tile, (count, count, 1))[:side, :side])


def large_canvas(side: int, small_width: int, member: Path = MEMBER) -> np.ndarray:
    ramp = np.linspace(60, 200, side, dtype=np.float32)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = ramp[None, :, None].astype(np.uint8)
    small = scaled(decode_image(member), small_width)
    top, left = side // 3, side // 2
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


def crowd_of(photo: Path, cell: int, side: int = 640) -> np.ndarray:
    """A crowd of the best face in `photo` (as the default detector finds it)."""
    from filter.faces import MtcnnDetector

    box = MtcnnDetector().detect([decode_image(photo)])[0][0].box
    return crowd(face_crop(photo, box), side, cell)
