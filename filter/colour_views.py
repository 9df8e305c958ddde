"""A frame as colour-managed viewers show it, where that differs from its raw pixels.

Browsers and photo viewers convert an image's pixels to the display's colour space with
the profile the file carries (an ICC profile in PNG iCCP, JPEG APP2, WebP ICCP, a TIFF
tag or a BMP V5 header, read by filter.pil_quirks; or PNG's gAMA and cHRM chunks). A
profile can map a narrow band of stored values to the full range: a face stored at
values 120 to 136 is a flat grey panel to a decoder and a normal face to a viewer. So a
frame whose managed views differ from its raw ones by more than `VISIBLE_DIFFERENCE` is
also checked as managed (`filter.images.frame_views`, which manages the colour before it
composites any transparency, as viewers do); a profile facegate cannot apply makes the
file's content unaccounted (it is not passed).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageCms

# Largest per-channel difference (of 255) between the managed and the raw view that is
# not checked again: what an sRGB or near-sRGB profile moves, far below what it takes to
# hide a face from the detector in one view and show it in the other.
VISIBLE_DIFFERENCE = 8
# PNG's gAMA for sRGB-like data is 1/2.2 (45455 in the chunk); within this relative
# distance of it the raw view is what a viewer shows.
GAMMA_TOLERANCE = 0.02
# sRGB's white point and primaries (x, y): white, red, green, blue, as PNG cHRM orders them.
SRGB_CHROMATICITY = (0.3127, 0.3290, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
CHROMATICITY_TOLERANCE = 0.005
_DISPLAY_GAMMA = 2.2
_ICC_SPACES = {
    "RGB ": ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"),
    "GRAY": ("L", "LA", "La", "1"),
    "CMYK": ("CMYK",),
}
ICC_NAME = "as its ICC profile shows it"
PNG_NAME = "as its PNG gamma and chromaticities show it"


@dataclass(frozen=True)
class ColourTransform:
    """How a viewer manages a frame's colours: `apply` maps its (H, W, 3) uint8 colour
    channels, before any compositing, to what the viewer shows (None: nothing to manage);
    `problem` says why it cannot be said."""

    apply: Callable[[np.ndarray], np.ndarray] | None = None
    name: str = ""
    problem: str = ""


def colour_transform(img: Image.Image) -> ColourTransform:
    """The transform of the frame `img` (EXIF-oriented, its own mode). PNG's rule of
    precedence: iCCP over sRGB over gAMA and cHRM."""
    icc = img.info.get("icc_profile")
    if icc:
        return _icc_transform(img, icc)
    if "srgb" not in img.info:  # gamma and chromaticity come from PNG only
        return _png_chunk_transform(img.info)
    return ColourTransform()


def visible(managed: np.ndarray, raw: np.ndarray) -> bool:
    """Whether a managed view shows more than its raw one (differs beyond
    VISIBLE_DIFFERENCE somewhere, or in shape)."""
    if managed.shape != raw.shape:
        return True
    difference = np.abs(managed.astype(np.int16) - raw.astype(np.int16)).max(initial=0)
    return bool(difference > VISIBLE_DIFFERENCE)


def _icc_transform(img: Image.Image, icc: bytes) -> ColourTransform:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = str(profile.profile.xcolor_space)
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as exc:
        return ColourTransform(problem=f"an ICC profile facegate cannot read ({exc})")
    modes = _ICC_SPACES.get(space)
    if modes is None or img.mode not in modes:
        return ColourTransform(
            problem=f"an ICC profile for {space.strip() or 'unknown'} colour on "
            f"{img.mode} pixels, which facegate does not apply"
        )
    source_mode = {"RGB ": "RGB", "GRAY": "L", "CMYK": "CMYK"}[space]
    try:
        transform = ImageCms.buildTransform(
            profile, ImageCms.createProfile("sRGB"), source_mode, "RGB"
        )
        # CMYK frames have no alpha: their managed view comes from the CMYK pixels
        # themselves, never from the RGB the filter otherwise sees.
        cmyk = (
            np.asarray(ImageCms.applyTransform(img, transform), dtype=np.uint8)
            if space == "CMYK"
            else None
        )
    except (OSError, ValueError, ImageCms.PyCMSError) as exc:
        return ColourTransform(problem=f"an ICC profile facegate cannot apply ({exc})")

    def apply(colour: np.ndarray) -> np.ndarray:
        if cmyk is not None:
            return cmyk
        channels = np.ascontiguousarray(colour[..., 0] if source_mode == "L" else colour)
        managed = ImageCms.applyTransform(Image.fromarray(channels, source_mode), transform)
        assert managed is not None  # applyTransform returns the image unless inPlace
        return np.asarray(managed, dtype=np.uint8)

    return ColourTransform(apply, ICC_NAME)


def _png_chunk_transform(info: Mapping[Any, object]) -> ColourTransform:
    gamma = info.get("gamma")
    chromaticity = info.get("chromaticity")
    if gamma is None and chromaticity is None:
        return ColourTransform()
    if gamma is not None and not (isinstance(gamma, float) and 0.0 < gamma < 100.0):
        return ColourTransform(
            problem=f"a PNG gamma (gAMA) of {gamma}, which facegate does not apply"
        )
    file_gamma = float(gamma) if isinstance(gamma, float) else 1.0 / _DISPLAY_GAMMA
    primaries: tuple[float, ...] = SRGB_CHROMATICITY
    if chromaticity is not None:
        values = tuple(float(v) for v in chromaticity)  # type: ignore[attr-defined]
        if max(abs(a - b) for a, b in zip(values, SRGB_CHROMATICITY, strict=True)) > (
            CHROMATICITY_TOLERANCE
        ):
            primaries = values
    plain_gamma = abs(file_gamma * _DISPLAY_GAMMA - 1.0) <= GAMMA_TOLERANCE
    if plain_gamma and primaries == SRGB_CHROMATICITY:
        return ColourTransform()
    # Stored samples are linear light to the power of the file's gamma.
    linear = (np.arange(256, dtype=np.float64) / 255.0) ** (1.0 / file_gamma)
    matrix = None
    if primaries != SRGB_CHROMATICITY:
        try:
            matrix = np.linalg.solve(_rgb_to_xyz(SRGB_CHROMATICITY), _rgb_to_xyz(primaries))
        except np.linalg.LinAlgError:
            matrix = None
        if matrix is None or not np.isfinite(matrix).all():
            return ColourTransform(problem="PNG chromaticities (cHRM) that define no colour space")

    def apply(colour: np.ndarray) -> np.ndarray:
        light = linear[colour]
        if matrix is not None:
            light = np.clip(light @ matrix.T, 0.0, 1.0)
        return np.round(255.0 * light ** (1.0 / _DISPLAY_GAMMA)).astype(np.uint8)

    return ColourTransform(apply, PNG_NAME)


def _rgb_to_xyz(chromaticity: tuple[float, ...]) -> np.ndarray:
    """The matrix from linear RGB with these primaries and white point to CIE XYZ."""
    wx, wy, rx, ry, gx, gy, bx, by = chromaticity
    if min(wy, ry, gy, by) <= 0.0:
        raise np.linalg.LinAlgError("a chromaticity with y = 0")
    primaries = np.array(
        [[x / y, 1.0, (1.0 - x - y) / y] for x, y in ((rx, ry), (gx, gy), (bx, by))]
    ).T
    white = np.array([wx / wy, 1.0, (1.0 - wx - wy) / wy])
    return primaries * np.linalg.solve(primaries, white)
