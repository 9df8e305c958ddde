"""The replica signal: is a candidate a copy of an enrolled training image, however a
training loop's augmentations may have changed it?

Generators memorise whole training images, not only identities (Carlini et al. 2023
extracted them by pixel-space distance; Somepalli et al. 2023 with a copy-detection
embedding). An identity embedder is built to ignore what a copy keeps (pose, lighting,
background), so it misses some copies that pixels give away. And generators are trained
with augmentation (flips almost always, often crops and shifts), so a memorised image
comes back mirrored, or cropped or shifted and resized back, as often as it was.

The feature is the whole image at low frequency: area-resampled to a 32x32 working frame,
blurred (sigma 1 px there), area-resampled to 16x16, its outer rows and columns tapered
(a crop or shift changes the border most), each channel's mean removed (so a brightness
shift is not a new image; the cosine ignores a contrast change), and projected onto 64
discriminant directions: those along which training images differ most from one another
relative to how much the augmentations move a single image (Fisher's criterion, fitted on
the training images' augmented views), each scaled to unit variance. The cosine then
responds to what distinguishes one training image from the others rather than to what
every face shares, and little to a crop or shift.

The index stores **one row per training image** (the image as it is), no more numbers than
format 2 did: stored rows must not be invertible into a recognisable face, and every
extra row or dimension per image is more for a decoder to work with (README "The
threshold", `bench/replica_inversion.py`). The augmentations are undone on the candidate
instead, at query time:
- each candidate is searched through 18 views (itself, each of nine 88 % windows zoomed
  back out to where it came from, each of eight 10 % shifts moved back) and the same 18
  of its mirror image, 36 searches, and the best match counts. A crop or shift of up to
  15 % then lands near one view; the blur absorbs the rest, and small rotations,
  brightness, contrast and recompression barely move a low-frequency feature;
- a view that undoes a crop or shift counts VIEW_MARGIN less than the candidate as it is
  or mirrored: a stranger's best of 36 views scores higher than its best of one, and
  without the margin the threshold that keeps false rejects at the target would rise
  and let through near-copies that only the view as it is matches (README "The threshold");
- a view whose search finds nothing makes the candidate's match NO_MATCH (fail closed).

Every step from the working frame to a view's projected row (resampling, blur, area
averaging, channel means, projection) is linear, and crops and shifts act on each axis
separately. Each view is therefore one (components x 3072) matrix, and a batch of
candidates is projected through all 36 views by one matrix product (about 7 MFLOP per
candidate), then searched in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from filter.errors import IndexCorruptError

FEATURE_NAME = "lowfreq-discriminant-query-views-v3"
# Every image, whatever its size, is first area-resampled to this square working frame;
# the views and the feature are computed there (enrolment and search alike).
FRAME_SIDE = 32
LOW_RES_SIDE = 16
BLUR_SIGMA = 1.0  # pixels of the working frame
# Stored numbers per training image. 64 is format 2's: a larger row inverts better
# (README "The threshold").
DEFAULT_COMPONENTS = 64
# The share of each side of the 16x16 image over which a raised cosine tapers it to 0.
TAPER = 0.125
# Regularises the augmentations' scatter (this share of its mean variance is added to
# every direction), so directions the views barely move are not taken as infinitely
# discriminant.
WITHIN_FLOOR = 0.01
# Query views: each undoes one augmentation a training loop may have applied.
CROP_SIDE = 0.88
CROP_POSITIONS = tuple((fx, fy) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0))
SHIFT = 0.10
SHIFTS = tuple(
    (dx * SHIFT, dy * SHIFT) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)
)
VIEWS = 1 + len(CROP_POSITIONS) + len(SHIFTS)
QUERY_VIEWS = 2 * VIEWS  # each view of the candidate and of its mirror image
# Subtracted from the cosine of every view but the candidate as it is and mirrored.
VIEW_MARGIN = 0.06
# Stored rows per training image: one, whatever the views (the non-invertibility rule).
ROWS_PER_IMAGE = 1
# Training images whose views fit the projection (a sample beyond this); more only costs
# build time. The covariance is accumulated in chunks: memory stays O(dimension^2).
MAX_FIT_IMAGES = 20_000
FIT_CHUNK = 512
# Candidates projected at once: bounds the (chunk, 36, components) intermediate.
QUERY_CHUNK = 256
PROJECTION_FILE = "replica_projection.npy"
# Below this many training images the projection has too few components for a
# cosine to mean anything (in 3 dimensions one random pair in 20 scores above 0.9), so
# the index carries no replica signal and says so; the identity signal still applies.
MIN_REPLICA_IMAGES = 32
LOW_RES_DIM = LOW_RES_SIDE * LOW_RES_SIDE * 3
FRAME_DIM = FRAME_SIDE * FRAME_SIDE * 3

# One axis of a view: output pixel x samples the input at scale * x + offset (pixels of
# the working frame), bilinearly, the border reflected (as filter.augment fills it).
Axis = tuple[float, float]
View = tuple[Axis, Axis]  # (x axis, y axis)


def frames(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 32, 32, 3) uint8: each image area-resampled to the working frame. What an
    enrolment keeps in memory until the projection is fitted; never written."""
    out = np.empty((len(images), FRAME_SIDE, FRAME_SIDE, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(
            np.ascontiguousarray(image), (FRAME_SIDE, FRAME_SIDE), interpolation=cv2.INTER_AREA
        )
    return out


def _crop_origin(f: float, side: float) -> float:
    return f * (FRAME_SIDE - side * FRAME_SIDE)


def augmented_views() -> list[View]:
    """What a training loop may give back of a training image: itself, each crop resized
    back, each shift (filter.augment.crop and .shift). The projection is fitted on these."""
    s = CROP_SIDE
    return [
        ((1.0, 0.0), (1.0, 0.0)),
        *(
            (
                (s, 0.5 * s + _crop_origin(fx, s) - 0.5),
                (s, 0.5 * s + _crop_origin(fy, s) - 0.5),
            )
            for fx, fy in CROP_POSITIONS
        ),
        *(((1.0, -dx * FRAME_SIDE), (1.0, -dy * FRAME_SIDE)) for dx, dy in SHIFTS),
    ]


def query_views() -> list[View]:
    """Each augmented view undone on a candidate (a crop zoomed back out to its window, a
    shift moved back), then the same on the candidate's mirror image: QUERY_VIEWS."""
    s = CROP_SIDE
    undone: list[View] = [
        ((1.0, 0.0), (1.0, 0.0)),
        *(
            (
                (1.0 / s, (0.5 - _crop_origin(fx, s)) / s - 0.5),
                (1.0 / s, (0.5 - _crop_origin(fy, s)) / s - 0.5),
            )
            for fx, fy in CROP_POSITIONS
        ),
        *(((1.0, dx * FRAME_SIDE), (1.0, dy * FRAME_SIDE)) for dx, dy in SHIFTS),
    ]
    last = FRAME_SIDE - 1
    # Mirrored first, then undone: the sample at x comes from last - (scale * x + offset).
    mirrored: list[View] = [((-a, last - b), y) for (a, b), y in undone]
    return undone + mirrored


def _reflect(i: int, n: int) -> int:
    """Index into n samples with the border reflected, edge not repeated (BORDER_REFLECT_101)."""
    period = 2 * (n - 1)
    i = abs(i) % period
    return period - i if i >= n else i


def _sampling(axis: Axis) -> np.ndarray:
    """(FRAME_SIDE, FRAME_SIDE): bilinear resampling of one axis."""
    scale, offset = axis
    out = np.zeros((FRAME_SIDE, FRAME_SIDE), dtype=np.float64)
    for x in range(FRAME_SIDE):
        u = scale * x + offset
        i0 = math.floor(u)
        t = u - i0
        out[x, _reflect(i0, FRAME_SIDE)] += 1.0 - t
        out[x, _reflect(i0 + 1, FRAME_SIDE)] += t
    return out


@cache
def _low_pass() -> np.ndarray:
    """(LOW_RES_SIDE, FRAME_SIDE): the Gaussian blur (cv2.GaussianBlur's kernel for float
    images, reflected border), area averaging down to LOW_RES_SIDE, then the taper."""
    radius = math.ceil(4 * BLUR_SIGMA)
    kernel = cv2.getGaussianKernel(2 * radius + 1, BLUR_SIGMA, cv2.CV_64F)[:, 0]
    blur = np.zeros((FRAME_SIDE, FRAME_SIDE), dtype=np.float64)
    for x in range(FRAME_SIDE):
        for k, weight in enumerate(kernel):
            blur[x, _reflect(x + k - radius, FRAME_SIDE)] += weight
    factor = FRAME_SIDE // LOW_RES_SIDE
    area = np.kron(np.eye(LOW_RES_SIDE), np.full((1, factor), 1.0 / factor))
    centres = (np.arange(LOW_RES_SIDE) + 0.5) / LOW_RES_SIDE
    ramp = np.clip(np.minimum(centres, 1.0 - centres) / TAPER, 0.0, 1.0)
    taper = 0.5 - 0.5 * np.cos(np.pi * ramp)
    return taper[:, None] * (area @ blur)


def axis_operators(views: Sequence[View]) -> np.ndarray:
    """(len(views), 2, LOW_RES_SIDE, FRAME_SIDE): per view, the x and the y operator
    taking a working frame's axis to the feature's 16 samples (resample, blur, average)."""
    low_pass = _low_pass()
    return np.stack(
        [
            np.stack([low_pass @ _sampling(x_axis), low_pass @ _sampling(y_axis)])
            for x_axis, y_axis in views
        ]
    )


def low_res(frame_stack: np.ndarray, view: View = ((1.0, 0.0), (1.0, 0.0))) -> np.ndarray:
    """(N, 16*16*3) float32 of working frames seen through `view` (default: as they are):
    resampled, blurred, area-averaged to 16x16, channel means removed."""
    (x_op, y_op) = axis_operators([view])[0]
    framed = np.asarray(frame_stack, dtype=np.float32)
    small = np.einsum("pi,nijc,qj->npqc", y_op, framed, x_op, optimize=True)
    small -= small.mean(axis=(1, 2), keepdims=True)
    return small.reshape(len(framed), LOW_RES_DIM).astype(np.float32)


def _unit(projected: np.ndarray) -> np.ndarray:
    """Unit rows along the last axis; a row that projects to nothing (norm ~0) becomes
    NaN, which finds no neighbour and so is rejected as a filter error rather than passed."""
    norms = np.linalg.norm(projected, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norms > 1e-6, projected / norms, np.nan)
    return unit.astype(np.float32)


def _fixed_spec() -> dict[str, object]:
    """What the code fixes about the feature: an index must have been built with the same."""
    return {
        "feature": FEATURE_NAME,
        "frame_side": FRAME_SIDE,
        "low_res_side": LOW_RES_SIDE,
        "blur_sigma": BLUR_SIGMA,
        "rows_per_image": ROWS_PER_IMAGE,
        "query_views": QUERY_VIEWS,
        "view_margin": VIEW_MARGIN,
        "taper": TAPER,
    }


@dataclass(frozen=True)
class ReplicaFeaturizer:
    """Discriminant projection of the low-resolution working frame, fitted on the training
    images' augmented views; one stored row per image, QUERY_VIEWS searched per candidate."""

    mean: np.ndarray  # (768,)
    basis: np.ndarray  # (components, 768), rows already scaled to unit variance

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def fit(
        cls, frame_stack: np.ndarray, components: int = DEFAULT_COMPONENTS
    ) -> ReplicaFeaturizer:
        """Fit on the augmented views of the training images' working frames (`frames`):
        the directions that best separate training images relative to their views."""
        frame_stack = np.asarray(frame_stack)
        if len(frame_stack) > MAX_FIT_IMAGES:
            sample = np.random.default_rng(0).permutation(len(frame_stack))[:MAX_FIT_IMAGES]
            frame_stack = frame_stack[np.sort(sample)]
        images = len(frame_stack)
        view_list = augmented_views() + query_views()[1:]
        total = np.zeros(LOW_RES_DIM, dtype=np.float64)
        view_scatter = np.zeros((LOW_RES_DIM, LOW_RES_DIM), dtype=np.float64)
        centre_scatter = np.zeros((LOW_RES_DIM, LOW_RES_DIM), dtype=np.float64)
        for start in range(0, images, FIT_CHUNK):
            chunk = frame_stack[start : start + FIT_CHUNK]
            centres = np.zeros((len(chunk), LOW_RES_DIM), dtype=np.float64)
            for view in view_list:
                rows = low_res(chunk, view).astype(np.float64)
                view_scatter += rows.T @ rows
                centres += rows / len(view_list)
            total += centres.sum(axis=0)
            centre_scatter += centres.T @ centres
        mean = total / max(images, 1)
        # Between images: the scatter of each image's mean view. Within: of views about it.
        between = centre_scatter / max(images, 1) - np.outer(mean, mean)
        within = view_scatter / max(images * len(view_list), 1) - centre_scatter / max(images, 1)
        within += (
            WITHIN_FLOOR * max(float(np.trace(within)) / LOW_RES_DIM, 1e-6) * np.eye(LOW_RES_DIM)
        )
        # Fisher's directions: between v = lambda within v, through within's Cholesky factor.
        inverse_factor = np.linalg.inv(np.linalg.cholesky(within))
        ratios, rotated = np.linalg.eigh(inverse_factor @ between @ inverse_factor.T)
        order = np.argsort(ratios)[::-1]
        # At most (images - 1) directions tell training images apart.
        k = max(1, min(components, images - 1, LOW_RES_DIM))
        directions = inverse_factor.T @ rotated[:, order[:k]]
        # Each direction scaled to unit variance over all views (between + within).
        variance = np.einsum("dk,de,ek->k", directions, between + within, directions)
        basis = (directions / np.sqrt(np.maximum(variance, 1e-12))).T
        return cls(mean=mean.astype(np.float32), basis=basis.astype(np.float32))

    @cached_property
    def _query_operator(self) -> tuple[np.ndarray, np.ndarray]:
        """(QUERY_VIEWS * components, 3072) and (components,): a frame's projected row
        through every query view is operator @ frame - offset."""
        basis = self.basis.astype(np.float64).reshape(self.dim, LOW_RES_SIDE, LOW_RES_SIDE, 3)
        # Removing each channel's mean from the 16x16 image is removing it from the basis.
        centred = basis - basis.mean(axis=(1, 2), keepdims=True)
        operators = axis_operators(query_views())
        stacked = np.einsum(
            "kpqc,vpi,vqj->vkijc", centred, operators[:, 1], operators[:, 0], optimize=True
        )
        offset = self.basis.astype(np.float64) @ self.mean.astype(np.float64)
        return (
            np.ascontiguousarray(stacked.reshape(-1, FRAME_DIM), dtype=np.float32),
            offset.astype(np.float32),
        )

    def project(self, low_res_rows: np.ndarray) -> np.ndarray:
        """Unit rows of low-resolution rows (`low_res`)."""
        return _unit((np.asarray(low_res_rows, dtype=np.float32) - self.mean) @ self.basis.T)

    def enrolled(self, frame_stack: np.ndarray) -> np.ndarray:
        """(N, components): the stored replica row of each training image (as it is)."""
        if len(frame_stack) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.project(low_res(np.asarray(frame_stack)))

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, components): each image as it is, as a training image is stored."""
        return self.enrolled(frames(images))

    def queries(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, QUERY_VIEWS, components): each image through every query view; a search
        keeps the best, and fails closed if any finds nothing."""
        operator, offset = self._query_operator
        framed = frames(images).reshape(len(images), FRAME_DIM).astype(np.float32)
        out = np.empty((len(images), QUERY_VIEWS, self.dim), dtype=np.float32)
        for start in range(0, len(images), QUERY_CHUNK):
            projected = framed[start : start + QUERY_CHUNK] @ operator.T
            projected = projected.reshape(-1, QUERY_VIEWS, self.dim) - offset
            out[start : start + QUERY_CHUNK] = _unit(projected)
        return out

    @staticmethod
    def view_margins() -> np.ndarray:
        """(QUERY_VIEWS,): what each query view's cosine counts less (VIEW_MARGIN for the
        views that undo a crop or shift, 0 for the candidate as it is and mirrored)."""
        margins = np.full(QUERY_VIEWS, VIEW_MARGIN, dtype=np.float32)
        margins[[0, VIEWS]] = 0.0
        return margins

    def spec(self) -> dict[str, object]:
        return {**_fixed_spec(), "components": self.dim, "projection_file": PROJECTION_FILE}

    def save(self, folder: Path) -> None:
        np.save(folder / PROJECTION_FILE, np.vstack([self.mean[None, :], self.basis]))

    @classmethod
    def load(cls, source: BinaryIO, spec: dict[str, object], path: Path) -> ReplicaFeaturizer:
        """The projection from an open file (`path` names it in messages)."""
        expected_spec = _fixed_spec()
        differing = [k for k, v in expected_spec.items() if spec.get(k) != v]
        if differing:
            raise IndexCorruptError(
                f"{path.parent}: replica feature {spec.get('feature')!r} ({', '.join(differing)} "
                f"differ) is not this facegate's {FEATURE_NAME!r}; rebuild the index with "
                f"`facegate index build GALLERY --out {path.parent}`"
            )
        try:
            stacked = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"cannot read {path}: {exc}") from None
        expected = (int(str(spec.get("components", -1))) + 1, LOW_RES_DIM)
        if stacked.shape != expected or not np.isfinite(stacked).all():
            raise IndexCorruptError(
                f"{path} has shape {stacked.shape}, expected {expected} finite values"
            )
        return cls(mean=stacked[0].astype(np.float32), basis=stacked[1:].astype(np.float32))
