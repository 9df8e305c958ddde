"""The identity filter: images in, verdicts out, in batches.

All faces of all images in a call are aligned and embedded in batches of
`max_embed_batch` (aligned just before their batch is embedded, so memory does not grow
with the faces) and searched in one FAISS call; the cost per face approaches the
embedder's own. Calls from two threads overlap stage by stage (see
`FaceEmbeddingPipeline`). Evidence the filter cannot trust (an embedding that is not
finite or not unit length, a search with no neighbour) becomes a `filter_error` rejection
of that image only. An image with more faces than the detector's `max_faces` has none of
them embedded: it is rejected as `too_many_faces` (the bound on what one image may cost).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from filter.alignment import align_face
from filter.decide import DecisionThresholds, ImageEvidence, ImageVerdict, NoFacePolicy, decide
from filter.embedders import Embedder
from filter.errors import FilterError
from filter.faces import DetectedFace, DetectorSettings, FaceAligner
from filter.index import IdentityIndex
from filter.overlap import thread_stream
from filter.stages import STAGES
from filter.vector_table import NO_MATCH, Match


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
    searchable: bool = True  # False: the detector cannot search an image of this geometry
    # Faces found but not embedded: the image holds more than `face_limit` (then `faces`
    # is empty and this is how many were found).
    unsearched_faces: int = 0
    face_limit: int | None = None

    @property
    def faces_found(self) -> int:
        return len(self.faces) + self.unsearched_faces


@dataclass(frozen=True, eq=False)
class Lane:
    """One detector (behind its aligner) and one embedder, with a lock per stage: what a
    batch computes on."""

    aligner: FaceAligner
    embedder: Embedder
    detect_lock: threading.Lock = field(default_factory=threading.Lock)
    embed_lock: threading.Lock = field(default_factory=threading.Lock)


class FaceEmbeddingPipeline:
    """Detect, align and embed: shared by index building, calibration and checking.

    Stages and overlap: detection (with alignment) and embedding each serve one batch at a
    time (a lock per stage), so two threads checking two batches at once form a pipeline:
    one batch is detected while the other is embedded or searched (`filter.overlap`). A
    stage's time is measured once its lock is held, so it never counts the wait. On a CUDA
    device each calling thread computes on its own stream (`filter.overlap.thread_stream`),
    so one batch's host synchronisations do not wait for the other's kernels.

    Lanes: a pipeline may also hold more lanes, each with its own networks and embedder
    (the same models). A call then takes a free lane for all its stages, so threads check
    their batches side by side, each on its own share of the cores: on the CPU, where a
    stage's threads scale worse than whole batches do (`filter.overlap.share_cores`).
    Every lane computes what the first does, so the verdicts are the same.
    """

    def __init__(
        self,
        aligner: FaceAligner,
        embedder: Embedder,
        max_embed_batch: int = 256,
        device: torch.device | str | None = None,
        more_lanes: Sequence[tuple[FaceAligner, Embedder]] = (),
    ):
        self._lanes = tuple(Lane(a, e) for a, e in [(aligner, embedder), *more_lanes])
        for lane in self._lanes:
            if lane.aligner.crop_size != lane.embedder.crop_size:
                raise ValueError("aligner crop size must match the embedder's input size")
        for lane in self._lanes[1:]:
            if _model_of(lane) != _model_of(self._lanes[0]):
                raise ValueError("every lane must run the same detector settings and embedder")
        self.aligner = aligner
        self.embedder = embedder
        self.max_embed_batch = max_embed_batch
        # The detector's device (where the pipeline computes); the embedder says its own.
        self.device = torch.device(
            device if device is not None else getattr(aligner.detector, "device", "cpu")
        )
        # Free lanes, by position: shared with the pipelines derived from this one
        # (`with_aligners`), whose lanes run on the same networks and embedders.
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for position in range(len(self._lanes)):
            self._free.put(position)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def embedders(self) -> tuple[Embedder, ...]:
        """Every lane's embedder (`embedder` is the first's)."""
        return tuple(lane.embedder for lane in self._lanes)

    def with_aligners(self, remake: Callable[[FaceAligner], FaceAligner]) -> FaceEmbeddingPipeline:
        """The same embedders, lanes, batch size and device, each lane's aligner remade from
        its own (a detection scope, the turned search)."""
        first, *more = self._lanes
        derived = FaceEmbeddingPipeline(
            remake(first.aligner),
            first.embedder,
            self.max_embed_batch,
            device=self.device,
            more_lanes=[(remake(lane.aligner), lane.embedder) for lane in more],
        )
        # One pool of free lanes for both: a batch through either (a filter swapped in by
        # a reload while the last one's batches finish) never waits on a lane in use.
        derived._free = self._free
        return derived

    @property
    def max_faces(self) -> int:
        """Faces searched in one image at most (the detector's setting)."""
        settings = getattr(self.aligner.detector, "settings", None)
        if isinstance(settings, DetectorSettings):
            return settings.max_faces
        return DetectorSettings().max_faces

    def embed_images(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageFaces]:
        with thread_stream(self.device):
            if len(self._lanes) == 1:  # shared stage by stage
                return self._embed_images(self._lanes[0], images, observer)
            position = self._free.get()  # the whole call's, not timed as any stage
            try:
                return self._embed_images(self._lanes[position], images, observer)
            finally:
                self._free.put(position)

    def _embed_images(
        self, lane: Lane, images: Sequence[np.ndarray], observer: StageObserver | None
    ) -> list[ImageFaces]:
        # Each stage's lock is taken before its clock starts: the stage metrics count work,
        # not waiting for another batch in flight. Alignment needs no lock (pure, per call).
        times = StageTimes()
        detector, embedder = lane.aligner.detector, lane.embedder
        with lane.detect_lock, _timed(times, "detect"):
            detected = detector.detect(images)
        limit = self.max_faces
        searched = [faces if len(faces) <= limit else [] for faces in detected]
        # (image, face) of every face to embed, in image order: batches of max_embed_batch
        # over this list are what the embedder sees (as when all crops were made first).
        to_embed = [(i, face) for i, faces in enumerate(searched) for face in faces]
        size = embedder.crop_size
        parts: list[np.ndarray] = []
        for start in range(0, len(to_embed), self.max_embed_batch):
            chunk = to_embed[start : start + self.max_embed_batch]
            with _timed(times, "detect"):  # alignment has always counted as detection
                crops = np.stack([align_face(images[i], f.landmarks, size) for i, f in chunk])
            with lane.embed_lock, _timed(times, "embed"):
                parts.append(embedder.embed(crops))
        vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
        if observer is not None:
            for stage in ("detect", "embed"):
                observer.observe_stage(stage, times.seconds[stage])
        if len(vectors) != len(to_embed):
            raise FilterError(
                f"embedder returned {len(vectors)} embeddings for {len(to_embed)} faces"
            )
        out: list[ImageFaces] = []
        offset = 0
        for image, faces, kept in zip(images, detected, searched, strict=True):
            out.append(
                ImageFaces(
                    faces=kept,
                    embeddings=vectors[offset : offset + len(kept)],
                    searchable=detector.searchable(image.shape[0], image.shape[1]),
                    unsearched_faces=len(faces) - len(kept),
                    face_limit=limit,
                )
            )
            offset += len(kept)
        return out


def _model_of(lane: Lane) -> tuple[object, ...]:
    """What a lane computes: its detector's settings and its embedder's model."""
    embedder = lane.embedder
    return (
        getattr(lane.aligner.detector, "settings", None),
        type(lane.aligner.detector),
        embedder.name,
        getattr(embedder, "model_sha256", None),
        embedder.dim,
    )


def embedding_problem(embeddings: np.ndarray, faces: int, dim: int) -> str | None:
    """Why these embeddings cannot be trusted, or None: a wrong shape, a value that is not
    finite, or a row that is not unit length would all make a similarity meaningless."""
    if embeddings.ndim != 2 or embeddings.shape != (faces, dim):
        return f"embeddings of shape {embeddings.shape}, expected ({faces}, {dim})"
    if faces == 0:
        return None
    if not np.isfinite(embeddings).all():
        return "an embedding is not finite"
    norms = np.linalg.norm(embeddings, axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        return f"an embedding is not unit length (norm {float(norms.min()):.4f})"
    return None


class IdentityFilter:
    """Checks images against the index: the identity signal on every face, the replica
    signal on the whole image, thresholds and the no-face policy."""

    def __init__(
        self,
        embedding: FaceEmbeddingPipeline,
        index: IdentityIndex,
        thresholds: DecisionThresholds,
        no_face_policy: NoFacePolicy = NoFacePolicy.REJECT,
    ) -> None:
        # Resolved thresholds only (filter.thresholds): no default of its own here, so that
        # no path around resolve_thresholds can pick a replica threshold.
        if not isinstance(thresholds, DecisionThresholds):
            raise TypeError(f"thresholds must be DecisionThresholds, not {type(thresholds)}")
        if index.has_replicas and thresholds.replica is None:
            raise ValueError("the index holds replica features but no replica threshold is set")
        self.embedding = embedding
        self.index = index
        self.thresholds = thresholds
        self.no_face_policy = no_face_policy
        self._search_lock = threading.Lock()
        # Where the pipeline computes (its CUDA stream per thread); stand-ins have none.
        self.device = torch.device(getattr(embedding, "device", "cpu"))

    @property
    def threshold(self) -> float:
        return self.thresholds.identity

    def with_embedding(self, embedding: FaceEmbeddingPipeline) -> IdentityFilter:
        """The same index, thresholds and policy behind another pipeline (a detection
        scope, `filter.detection_policy`): nothing is resolved again."""
        return IdentityFilter(embedding, self.index, self.thresholds, self.no_face_policy)

    def evidence(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageEvidence]:
        """What the filter measures on each image, before thresholds: the nearest identity
        of each face and the nearest training image. Shared by check and evaluate."""
        with thread_stream(self.device):
            return self._evidence(images, observer)[0]

    def _evidence(
        self, images: Sequence[np.ndarray], observer: StageObserver | None
    ) -> tuple[list[ImageEvidence], list[ImageFaces]]:
        per_image = self.embedding.embed_images(images, observer)
        dim = self.embedding.embedder.dim
        problems = [embedding_problem(p.embeddings, len(p.faces), dim) for p in per_image]
        trusted = [
            p.embeddings for p, problem in zip(per_image, problems, strict=True) if not problem
        ]
        queries = np.concatenate(trusted) if trusted else np.zeros((0, dim), np.float32)
        with self._search_lock, _timed(observer, "search"):
            matches = self.index.search(queries)
            replicas: Sequence[Match | None] = (
                self.index.search_replicas(images)
                if self.index.has_replicas
                else [None] * len(images)
            )
        if len(matches) != len(queries) or len(replicas) != len(images):
            raise FilterError("the index returned a result count that differs from its input")
        out: list[ImageEvidence] = []
        offset = 0
        for item, problem, replica in zip(per_image, problems, replicas, strict=True):
            count = len(item.faces)
            if problem is not None:
                face_matches: Sequence[Match] = [NO_MATCH] * count
            else:
                face_matches = matches[offset : offset + count]
                offset += count
            out.append(
                ImageEvidence(
                    face_matches=face_matches,
                    replica=replica,
                    searchable=item.searchable,
                    error=problem,
                    unsearched_faces=item.unsearched_faces,
                    face_limit=item.face_limit,
                )
            )
        return out, per_image

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        """One verdict per image. `candidates` (which candidate each image shows) changes
        nothing here: it is for wrappers that count per candidate (filter.shadow)."""
        return [
            decide(evidence, self.thresholds, self.no_face_policy)
            for evidence in self.evidence(images, observer)
        ]

    def inspect(self, images: Sequence[np.ndarray]) -> tuple[list[ImageEvidence], list[ImageFaces]]:
        """The evidence on each image and the faces behind it (boxes, landmarks,
        embeddings), from one run: for comparing the filter across devices and batch sizes
        (`filter.agreement`), never for a caller of the service."""
        with thread_stream(self.device):
            return self._evidence(images, None)
