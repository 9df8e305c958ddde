"""The identity filter: images in, verdicts out, in batches.

All faces of all images in a call are aligned, embedded in one batch and searched
in one FAISS call; the cost per face approaches the embedder's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from filter.decide import ImageVerdict, NoFacePolicy, decide
from filter.embedders import Embedder
from filter.faces import DetectedFace, FaceAligner
from filter.index import IdentityIndex, Match

STAGES = ("detect", "embed", "search")


class StageObserver(Protocol):
    def observe_stage(self, stage: str, seconds: float) -> None: ...


@dataclass
class StageTimes:
    """Collects stage durations; the default observer, also handy in tests and benches."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


@contextmanager
def _timed(observer: StageObserver | None, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if observer is not None:
            observer.observe_stage(stage, time.perf_counter() - start)


@dataclass(frozen=True)
class ImageFaces:
    """Faces of one image and their unit-length embeddings (rows match `faces`)."""

    faces: list[DetectedFace]
    embeddings: np.ndarray


class FaceEmbeddingPipeline:
    """Detect, align and embed: shared by index building, calibration and checking."""

    def __init__(self, aligner: FaceAligner, embedder: Embedder, max_embed_batch: int = 256):
        if aligner.crop_size != embedder.crop_size:
            raise ValueError("aligner crop size must match the embedder's input size")
        self.aligner = aligner
        self.embedder = embedder
        self.max_embed_batch = max_embed_batch

    def embed_images(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageFaces]:
        with _timed(observer, "detect"):
            detected, crops = self.aligner.faces(images)
        counts = [len(c) for c in crops]
        all_crops = (
            np.concatenate(crops)
            if crops
            else np.zeros((0, self.embedder.crop_size, self.embedder.crop_size, 3), np.uint8)
        )
        with _timed(observer, "embed"):
            parts = [
                self.embedder.embed(all_crops[i : i + self.max_embed_batch])
                for i in range(0, len(all_crops), self.max_embed_batch)
            ]
            vectors = (
                np.concatenate(parts) if parts else np.zeros((0, self.embedder.dim), np.float32)
            )
        out: list[ImageFaces] = []
        offset = 0
        for faces, count in zip(detected, counts, strict=True):
            out.append(ImageFaces(faces=faces, embeddings=vectors[offset : offset + count]))
            offset += count
        return out


class IdentityFilter:
    """Checks images against the identity index with a threshold and a no-face policy."""

    def __init__(
        self,
        embedding: FaceEmbeddingPipeline,
        index: IdentityIndex,
        threshold: float,
        no_face_policy: NoFacePolicy = NoFacePolicy.REJECT,
    ) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is outside [-1, 1]")
        self.embedding = embedding
        self.index = index
        self.threshold = threshold
        self.no_face_policy = no_face_policy

    def check(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageVerdict]:
        per_image = self.embedding.embed_images(images, observer)
        dim = self.embedding.embedder.dim
        all_vectors = (
            np.concatenate([p.embeddings for p in per_image])
            if per_image
            else np.zeros((0, dim), np.float32)
        )
        with _timed(observer, "search"):
            matches = self.index.search(all_vectors)
        verdicts: list[ImageVerdict] = []
        offset = 0
        for item in per_image:
            count = len(item.faces)
            image_matches: list[Match] = matches[offset : offset + count]
            offset += count
            verdicts.append(decide(image_matches, self.threshold, self.no_face_policy))
        return verdicts
