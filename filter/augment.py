"""The augmentations generators are trained with, as image transforms.

A generator that memorised a training image can give it back as it saw it in training:
mirrored, cropped or shifted and resized back, slightly rotated, a little brighter or
darker, recompressed. `facegate evaluate` builds its probe sets with these transforms, and
the replica signal enrols a few geometric views of each training image (filter.replica).

Each transform maps one uint8 RGB image (H, W, 3) to another of the same size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray], np.ndarray]

# Outside the frame, a shifted or rotated image is filled with its own border mirrored,
# as torchvision's reflect padding does: no black band for a detector or a feature to key on.
BORDER = cv2.BORDER_REFLECT_101


def mirror(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def crop(image: np.ndarray, side: float, fx: float = 0.5, fy: float = 0.5) -> np.ndarray:
    """The window `side` times the frame (0 < side <= 1) whose top-left corner lies at
    (fx, fy) of the free margin (0.5, 0.5: centred), resized back to the frame."""
    height, width = image.shape[:2]
    w, h = side * width, side * height
    x0, y0 = fx * (width - w), fy * (height - h)
    # An affine map of the window onto the frame, pixel centres to pixel centres
    # (x + 0.5 = (u + 0.5 - x0) / side): sub-pixel windows stay exact.
    tx, ty = (0.5 - x0) / side - 0.5, (0.5 - y0) / side - 0.5
    return _warp(image, np.array([[1.0 / side, 0.0, tx], [0.0, 1.0 / side, ty]]))


def shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Translate by (dx, dy) of the frame's width and height."""
    height, width = image.shape[:2]
    return _warp(image, np.array([[1.0, 0.0, dx * width], [0.0, 1.0, dy * height]]))


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    height, width = image.shape[:2]
    return _warp(image, cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0))


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """An affine warp onto the same frame, bilinear, the border filled as BORDER."""
    height, width = image.shape[:2]
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=BORDER,
    )


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Every value times `factor` (torchvision's ColorJitter brightness)."""
    return np.clip(image.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level (torchvision's ColorJitter contrast)."""
    grey = float(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).mean())
    out = (image.astype(np.float32) - grey) * factor + grey
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def recompress(image: np.ndarray, format: str, quality: int) -> np.ndarray:
    """Encode as JPEG or WebP at `quality` and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format, quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


@dataclass(frozen=True)
class ProbeTransform:
    """A named family of transforms; `draw` picks one member with the given generator."""

    name: str
    description: str
    draw: Callable[[np.random.Generator], Transform]


def _signed(rng: np.random.Generator, magnitude: float) -> float:
    return float(magnitude if rng.random() < 0.5 else -magnitude)


def _random_crop(rng: np.random.Generator, smallest: float) -> Transform:
    side, fx, fy = float(rng.uniform(smallest, 1.0)), float(rng.random()), float(rng.random())
    return lambda image: crop(image, side, fx, fy)


def _augmented(rng: np.random.Generator) -> Transform:
    """What a training loop with all of these augmentations might give back at once."""
    flip = bool(rng.random() < 0.5)
    cropped = _random_crop(rng, 0.85)
    angle = float(rng.uniform(-5, 5))
    light = float(rng.uniform(0.9, 1.1))
    contrast_factor = float(rng.uniform(0.9, 1.1))
    codec = "JPEG" if rng.random() < 0.5 else "WEBP"
    quality = int(rng.integers(50, 91))

    def apply(image: np.ndarray) -> np.ndarray:
        out = mirror(image) if flip else image
        out = rotate(cropped(out), angle)
        out = contrast(brightness(out, light), contrast_factor)
        return recompress(out, codec, quality)

    return apply


# The probe sets `facegate evaluate` reports (one image per training image, parameters
# drawn with the evaluation's seed). Magnitudes are the bounds: crops and shifts
# up to 15 % with a resize back, rotations up to 5 degrees, brightness and contrast 10 %.
PROBE_TRANSFORMS: tuple[ProbeTransform, ...] = (
    ProbeTransform("mirrored", "flipped left-right", lambda rng: mirror),
    ProbeTransform(
        "crop_center_85", "the central 85 % resized back", lambda rng: lambda i: crop(i, 0.85)
    ),
    ProbeTransform(
        "crop_random_15",
        "a window of 85-100 % of the frame anywhere in it, resized back",
        lambda rng: _random_crop(rng, 0.85),
    ),
    ProbeTransform(
        "shift_15",
        "shifted by up to 15 % on each axis (reflected border)",
        lambda rng: (lambda dx, dy: lambda i: shift(i, dx, dy))(
            float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15))
        ),
    ),
    ProbeTransform(
        "mirrored_crop_15",
        "flipped, then a random 85-100 % window resized back",
        lambda rng: (lambda cropped: lambda i: cropped(mirror(i)))(_random_crop(rng, 0.85)),
    ),
    ProbeTransform(
        "rotate_5",
        "rotated by 5 degrees either way",
        lambda rng: (lambda a: lambda i: rotate(i, a))(_signed(rng, 5.0)),
    ),
    ProbeTransform(
        "brightness_10",
        "brightness 10 % up or down",
        lambda rng: (lambda f: lambda i: brightness(i, f))(1.0 + _signed(rng, 0.10)),
    ),
    ProbeTransform(
        "contrast_10",
        "contrast 10 % up or down",
        lambda rng: (lambda f: lambda i: contrast(i, f))(1.0 + _signed(rng, 0.10)),
    ),
    ProbeTransform(
        "jpeg",
        "recompressed as JPEG, quality 30-90",
        lambda rng: (lambda q: lambda i: recompress(i, "JPEG", q))(int(rng.integers(30, 91))),
    ),
    ProbeTransform(
        "webp",
        "recompressed as WebP, quality 30-90",
        lambda rng: (lambda q: lambda i: recompress(i, "WEBP", q))(int(rng.integers(30, 91))),
    ),
    ProbeTransform(
        "augmented",
        "all at once: a coin-flip mirror, crop, rotation, brightness, contrast, JPEG or WebP",
        _augmented,
    ),
)

PROBE_NAMES = tuple(t.name for t in PROBE_TRANSFORMS)


def probe_transform(name: str) -> ProbeTransform:
    for transform in PROBE_TRANSFORMS:
        if transform.name == name:
            return transform
    raise KeyError(f"unknown transform {name!r}; known: {', '.join(PROBE_NAMES)}")


def transformed(
    images: np.ndarray | list[np.ndarray], transform: ProbeTransform, seed: int
) -> list[np.ndarray]:
    """Each image through its own draw of `transform` (reproducible from `seed`)."""
    rng = np.random.default_rng(seed)
    return [transform.draw(rng)(np.asarray(image)) for image in images]
