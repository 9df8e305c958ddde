"""The replica signal: is a candidate a copy of an enrolled training image, however a
training loop's augmentations may have changed it?

Generators memorise whole training images, not only identities (Carlini et al. 2023
extracted them by pixel-space distance; Somepalli et al. 2023 with a copy-detection
embedding). An identity embedder is built to ignore what a copy keeps (pose, lighting,
background), so it misses some copies that pixels give away. And generators are trained
with augmentation (flips almost always, often crops and shifts), so a memorised image
comes back mirrored, or cropped or shifted and resized back, as often as it was.

The feature is the whole image at low frequency: area-resampled to a 32x32 working frame,
blurred (sigma 1 px there), area-resampled to 16x16, each channel's mean removed (so a
brightness shift is not a new image; the cosine ignores a contrast change), projected onto
principal components and whitened. Whitening spreads the variation of the training set
evenly over the components, so the cosine responds to what distinguishes one training
image from the others rather than to what every face shares.

Augmentations, by measurement (README "The threshold"; `python -m bench.replica_study`):
- each training image is enrolled as 18 views: itself, nine windows of 88 % of the frame
  (corners, edge centres, centre) resized back, and eight shifts by 10 % (reflected border).
  Crops and shifts of up to 15 % then land near one view; the blur absorbs the rest, and
  small rotations, brightness, contrast and recompression barely move a low-frequency feature;
- a candidate is searched as it is and mirrored (the better match counts), so a mirrored
  copy meets its original exactly, at half the storage of enrolling mirrored views;
- the projection is fitted on the views, so whitening does not amplify the directions that
  the augmentations move along.

What is stored is not a thumbnail: `components` numbers per view of each training image,
plus the projection (mean and basis, aggregated over the whole training set). How far an
attacker gets back from them is measured in README "The threshold" (`bench/replica_inversion.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from filter.augment import crop, mirror, shift
from filter.errors import IndexCorruptError

FEATURE_NAME = "lowfreq-views-pca-whitened-v2"
# Every image, whatever its size, is first area-resampled to this square working frame;
# views and the feature are computed there (enrolment and search alike).
FRAME_SIDE = 32
LOW_RES_SIDE = 16
BLUR_SIGMA = 1.0  # pixels of the working frame
DEFAULT_COMPONENTS = 128
# Enrolled views, in the order of each training image's block of rows.
CROP_SIDE = 0.88
CROP_POSITIONS = tuple((fx, fy) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0))
SHIFT = 0.10
SHIFTS = tuple(
    (dx * SHIFT, dy * SHIFT) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy) != (0, 0)
)
VIEWS = 1 + len(CROP_POSITIONS) + len(SHIFTS)
# Whitening divides by sqrt(variance + this share of the mean variance), so components
# with almost no variance (small galleries) are not blown up into noise.
WHITENING_FLOOR = 0.01
# Training images whose views fit the projection (a sample beyond this); more only costs
# build time. The covariance is accumulated in chunks: memory stays O(dimension^2).
MAX_FIT_IMAGES = 20_000
FIT_CHUNK = 512
PROJECTION_FILE = "replica_projection.npy"
# Below this many training images the whitened projection has too few components for a
# cosine to mean anything (in 3 dimensions one random pair in 20 scores above 0.9), so
# the index carries no replica signal and says so; the identity signal still applies.
MIN_REPLICA_IMAGES = 32
# Used when the index carries no calibration. Fresh generator samples against a 200-image
# training set stay below it (README "The threshold"). Calibrate (`facegate calibrate
# --save`) for a real training set.
DEFAULT_REPLICA_THRESHOLD = 0.90
LOW_RES_DIM = LOW_RES_SIDE * LOW_RES_SIDE * 3


def frames(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 32, 32, 3) uint8: each image area-resampled to the working frame. What an
    enrolment keeps in memory until the projection is fitted; never written."""
    out = np.empty((len(images), FRAME_SIDE, FRAME_SIDE, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(
            np.ascontiguousarray(image), (FRAME_SIDE, FRAME_SIDE), interpolation=cv2.INTER_AREA
        )
    return out


def low_res(frame_stack: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(N, 16*16*3) float32 of working frames: blurred, area-resampled to 16x16, channel
    means removed."""
    rows = np.empty((len(frame_stack), LOW_RES_DIM), dtype=np.float32)
    for i, frame in enumerate(frame_stack):
        blurred = cv2.GaussianBlur(
            np.asarray(frame, dtype=np.float32),
            (0, 0),
            BLUR_SIGMA,
            borderType=cv2.BORDER_REFLECT_101,
        )
        small = cv2.resize(blurred, (LOW_RES_SIDE, LOW_RES_SIDE), interpolation=cv2.INTER_AREA)
        small -= small.mean(axis=(0, 1), keepdims=True)
        rows[i] = small.reshape(-1)
    return rows


def views(frame: np.ndarray) -> list[np.ndarray]:
    """The enrolled views of one working frame (VIEWS of them, in row order)."""
    return [
        frame,
        *(crop(frame, CROP_SIDE, fx, fy) for fx, fy in CROP_POSITIONS),
        *(shift(frame, dx, dy) for dx, dy in SHIFTS),
    ]


def view_rows(frame_stack: np.ndarray) -> np.ndarray:
    """(N * VIEWS, 768) low-res rows of every view, image by image."""
    return low_res([view for frame in frame_stack for view in views(frame)])


@dataclass(frozen=True)
class ReplicaFeaturizer:
    """Whitened PCA projection of low-resolution views, fitted on the training images."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (components, D), rows already divided by their whitening scale

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def views(self) -> int:
        """Rows each training image occupies in the replica table."""
        return VIEWS

    @classmethod
    def fit(
        cls, frame_stack: np.ndarray, components: int = DEFAULT_COMPONENTS
    ) -> ReplicaFeaturizer:
        """Fit on the views of the training images' working frames (`frames`)."""
        frame_stack = np.asarray(frame_stack)
        if len(frame_stack) > MAX_FIT_IMAGES:
            sample = np.random.default_rng(0).permutation(len(frame_stack))[:MAX_FIT_IMAGES]
            frame_stack = frame_stack[np.sort(sample)]
        total = np.zeros(LOW_RES_DIM, dtype=np.float64)
        scatter = np.zeros((LOW_RES_DIM, LOW_RES_DIM), dtype=np.float64)
        count = 0
        for start in range(0, len(frame_stack), FIT_CHUNK):
            rows = view_rows(frame_stack[start : start + FIT_CHUNK]).astype(np.float64)
            total += rows.sum(axis=0)
            scatter += rows.T @ rows
            count += len(rows)
        mean = total / max(count, 1)
        covariance = (scatter - count * np.outer(mean, mean)) / max(count - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        # Views of one image are not independent: at most (images - 1) directions tell
        # training images apart, so no more components than that.
        k = max(1, min(components, len(frame_stack) - 1, LOW_RES_DIM))
        variance = np.maximum(eigenvalues[order[:k]], 0.0)
        floor = WHITENING_FLOOR * float(variance.mean()) if variance.size else 0.0
        scale = 1.0 / np.sqrt(variance + max(floor, 1e-6))
        basis = eigenvectors[:, order[:k]].T * scale[:, None]
        return cls(mean=mean.astype(np.float32), basis=basis.astype(np.float32))

    def project(self, low_res_rows: np.ndarray) -> np.ndarray:
        """Unit rows; a row that projects to nothing (norm ~0) becomes NaN, which finds
        no neighbour and so is rejected as a filter error rather than passed."""
        projected = (np.asarray(low_res_rows, dtype=np.float32) - self.mean) @ self.basis.T
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = np.where(norms > 1e-6, projected / norms, np.nan)
        return unit.astype(np.float32)

    def enrolled(self, frame_stack: np.ndarray) -> np.ndarray:
        """(N * VIEWS, components): the replica rows of training images, image by image."""
        if len(frame_stack) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.project(view_rows(np.asarray(frame_stack)))

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, components): each image as it is."""
        return self.project(low_res(frames(images)))

    def queries(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 2, components): each image as it is and mirrored; a search keeps the better."""
        framed = frames(images)
        both = (
            np.concatenate([framed, np.stack([mirror(f) for f in framed])])
            if len(framed)
            else framed
        )
        projected = self.project(low_res(both))
        return np.stack([projected[: len(framed)], projected[len(framed) :]], axis=1)

    def spec(self) -> dict[str, object]:
        return {
            "feature": FEATURE_NAME,
            "frame_side": FRAME_SIDE,
            "low_res_side": LOW_RES_SIDE,
            "blur_sigma": BLUR_SIGMA,
            "views": VIEWS,
            "query_mirrored": True,
            "components": self.dim,
            "projection_file": PROJECTION_FILE,
        }

    def save(self, folder: Path) -> None:
        np.save(folder / PROJECTION_FILE, np.vstack([self.mean[None, :], self.basis]))

    @classmethod
    def load(cls, source: BinaryIO, spec: dict[str, object], path: Path) -> ReplicaFeaturizer:
        """The projection from an open file (`path` names it in messages)."""
        expected_spec = {
            "feature": FEATURE_NAME,
            "frame_side": FRAME_SIDE,
            "low_res_side": LOW_RES_SIDE,
            "blur_sigma": BLUR_SIGMA,
            "views": VIEWS,
        }
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
