"""The replica signal: is a candidate a near-copy of an enrolled training image?

Generators memorise whole training images, not only identities (Carlini et al. 2023
extracted them by pixel-space distance; Somepalli et al. 2023 with a copy-detection
embedding). An identity embedder is built to ignore what a copy keeps (pose, lighting,
background), so it misses some copies that pixels give away.

The feature is the whole image at low frequency: an area-resampled 16x16 RGB copy with
each channel's mean removed (so a brightness shift is not a new image), projected onto
the principal components of the enrolled training images and whitened. Whitening spreads
the variation of the training set evenly over the components, so the cosine responds to
what distinguishes one training image from the others rather than to what every face
shares. On the default generator this took near-copies (latent + N(0, 0.2^2)) caught at 5 %
false rejects from 0.94 (plain 16x16 cosine) to 1.00; `facegate evaluate` reproduces it.

What is stored is compact and not a thumbnail: `components` numbers per training image,
plus the projection (mean and basis, aggregated over the whole training set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from filter.errors import IndexCorruptError

FEATURE_NAME = "lowfreq-pca-whitened-v1"
LOW_RES_SIDE = 16
DEFAULT_COMPONENTS = 64
# Whitening divides by sqrt(variance + this share of the mean variance), so components
# with almost no variance (small galleries) are not blown up into noise.
WHITENING_FLOOR = 0.01
# Enough images to estimate 64 principal components well; more only costs build time.
MAX_FIT_IMAGES = 20_000
PROJECTION_FILE = "replica_projection.npy"
# Below this many training images the whitened projection has too few components for a
# cosine to mean anything (in 3 dimensions one random pair in 20 scores above 0.9), so
# the index carries no replica signal and says so; the identity signal still applies.
MIN_REPLICA_IMAGES = 32
# Used when the index carries no calibration. Fresh generator samples against a 200-image
# training set stay below it; near-copies at sigma 0.1 score above it (README "Threshold").
# Calibrate (`facegate calibrate --save`) for a real training set.
DEFAULT_REPLICA_THRESHOLD = 0.90


def low_res(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 16*16*3) float32: each image area-resampled to 16x16, channel means removed."""
    rows = np.empty((len(images), LOW_RES_SIDE * LOW_RES_SIDE * 3), dtype=np.float32)
    for i, image in enumerate(images):
        small = cv2.resize(
            np.ascontiguousarray(image), (LOW_RES_SIDE, LOW_RES_SIDE), interpolation=cv2.INTER_AREA
        ).astype(np.float32)
        small -= small.mean(axis=(0, 1), keepdims=True)
        rows[i] = small.reshape(-1)
    return rows


@dataclass(frozen=True)
class ReplicaFeaturizer:
    """Whitened PCA projection of low-resolution images, fitted on the training images."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (components, D), rows already divided by their whitening scale

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def fit(
        cls, low_res_rows: np.ndarray, components: int = DEFAULT_COMPONENTS
    ) -> ReplicaFeaturizer:
        rows = np.asarray(low_res_rows, dtype=np.float64)
        if len(rows) > MAX_FIT_IMAGES:
            sample = np.random.default_rng(0).permutation(len(rows))[:MAX_FIT_IMAGES]
            rows = rows[np.sort(sample)]
        mean = rows.mean(axis=0)
        centred = rows - mean
        # One training image still gets a 1-d feature; more images, more components.
        k = max(1, min(components, len(rows) - 1, rows.shape[1]))
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        variance = singular[:k] ** 2 / max(len(rows) - 1, 1)
        floor = WHITENING_FLOOR * float(variance.mean()) if variance.size else 0.0
        scale = 1.0 / np.sqrt(variance + max(floor, 1e-6))
        basis = vt[:k] * scale[:, None]
        return cls(mean=mean.astype(np.float32), basis=basis.astype(np.float32))

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, components) unit rows; a flat image (no variation) gives a zero row, which
        finds no neighbour and so is rejected as a filter error rather than passed."""
        return self.project(low_res(images))

    def project(self, low_res_rows: np.ndarray) -> np.ndarray:
        projected = (np.asarray(low_res_rows, dtype=np.float32) - self.mean) @ self.basis.T
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = np.where(norms > 1e-6, projected / norms, np.nan)
        return unit.astype(np.float32)

    def spec(self) -> dict[str, object]:
        return {
            "feature": FEATURE_NAME,
            "low_res_side": LOW_RES_SIDE,
            "components": self.dim,
            "projection_file": PROJECTION_FILE,
        }

    def save(self, folder: Path) -> None:
        np.save(folder / PROJECTION_FILE, np.vstack([self.mean[None, :], self.basis]))

    @classmethod
    def load(cls, source: BinaryIO, spec: dict[str, object], path: Path) -> ReplicaFeaturizer:
        """The projection from an open file (`path` names it in messages)."""
        if spec.get("feature") != FEATURE_NAME or spec.get("low_res_side") != LOW_RES_SIDE:
            raise IndexCorruptError(
                f"{path.parent}: replica feature {spec.get('feature')!r} is not "
                f"{FEATURE_NAME!r}; rebuild the index with this facegate"
            )
        try:
            stacked = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"cannot read {path}: {exc}") from None
        expected = (int(str(spec.get("components", -1))) + 1, LOW_RES_SIDE * LOW_RES_SIDE * 3)
        if stacked.shape != expected or not np.isfinite(stacked).all():
            raise IndexCorruptError(
                f"{path} has shape {stacked.shape}, expected {expected} finite values"
            )
        return cls(mean=stacked[0].astype(np.float32), basis=stacked[1:].astype(np.float32))
