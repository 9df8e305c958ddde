"""The replica feature of index format 2 (facegate before issue 23), kept as the baseline
that `make bench` measures the current one against, side by side in one run: the whole
image area-resampled to 16x16, channel means removed, whitened PCA (64 components), one
row per training image, searched as it is. Copied from that version's filter/replica.py
and filter/index.py; used by nothing but the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from filter.index import FaissIdentityIndex
from filter.vector_table import NO_MATCH, Match, VectorTable, make_faiss_index

SIDE = 16
COMPONENTS = 64
WHITENING_FLOOR = 0.01


def low_res(images: Sequence[np.ndarray]) -> np.ndarray:
    rows = np.empty((len(images), SIDE * SIDE * 3), dtype=np.float32)
    for i, image in enumerate(images):
        small = cv2.resize(
            np.ascontiguousarray(image), (SIDE, SIDE), interpolation=cv2.INTER_AREA
        ).astype(np.float32)
        small -= small.mean(axis=(0, 1), keepdims=True)
        rows[i] = small.reshape(-1)
    return rows


class V1Featurizer:
    def __init__(self, training_images: Sequence[np.ndarray]) -> None:
        rows = low_res(training_images).astype(np.float64)
        mean = rows.mean(axis=0)
        k = max(1, min(COMPONENTS, len(rows) - 1, rows.shape[1]))
        _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
        variance = singular[:k] ** 2 / max(len(rows) - 1, 1)
        floor = WHITENING_FLOOR * float(variance.mean()) if variance.size else 0.0
        scale = 1.0 / np.sqrt(variance + max(floor, 1e-6))
        self.mean = mean.astype(np.float32)
        self.basis = (vt[:k] * scale[:, None]).astype(np.float32)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        projected = (low_res(images) - self.mean) @ self.basis.T
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norms > 1e-6, projected / norms, np.nan).astype(np.float32)


class V1ReplicaIndex:
    """An index's face table with a format-2 replica table of the same training images
    (the IdentityIndex protocol), so the same filter runs with either replica feature."""

    def __init__(self, index: FaissIdentityIndex, training_images: Sequence[np.ndarray]) -> None:
        self._index = index
        self.featurizer = V1Featurizer(training_images)
        features = self.featurizer.features(training_images)
        labels = [f"train-{i}" for i in range(len(training_images))]
        self.replicas = VectorTable(
            "replica features (v1)", make_faiss_index(features, "flat"), labels, labels
        )

    def search(self, queries: np.ndarray) -> list[Match]:
        return self._index.search(queries)

    @property
    def has_replicas(self) -> bool:
        return True

    def search_replicas(self, images: Sequence[np.ndarray]) -> list[Match]:
        if len(images) == 0:
            return []
        found = self.replicas.search(self.featurizer.features(images))
        return [m if m.found else NO_MATCH for m in found]

    @property
    def identity_count(self) -> int:
        return self._index.identity_count

    @property
    def vector_count(self) -> int:
        return self._index.vector_count
