"""Assembles the filter from names and paths: the one place that wires models together
and opens a filter over an index, so the CLI, batch, the index builder, calibration,
evaluation and the server all get the same pipeline, the same checks on the index and
the same thresholds (`filter.thresholds`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from filter.decide import DecisionThresholds, ImageEvidence, NoFacePolicy
from filter.embedders import load_embedder, resolve_device
from filter.faces import DetectorSettings, FaceAligner, MtcnnDetector
from filter.host_blas import single_threaded_numpy_blas
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageObserver
from filter.index import FaissIdentityIndex
from filter.models import verify_mtcnn_weights
from filter.numerics import apply_device_numerics
from filter.overlap import lanes_for, share_cores
from filter.thresholds import FilterInForce, Thresholds, in_force_for

log = logging.getLogger(__name__)


def build_embedding_pipeline(
    embedder: str,
    models_dir: Path,
    device: str = "cpu",
    facenet_weights: Path | None = None,
    detector_settings: DetectorSettings | None = None,
    detector: str | None = None,
    lanes: int = 1,
    threads_per_lane: int | None = None,
) -> FaceEmbeddingPipeline:
    """`detector` (FACEGATE_DETECTOR, --detector) picks the MTCNN implementation; None
    keeps the one in `detector_settings`, whose default is the batched one. On a CUDA
    device the process's floating-point policy (TF32 off) is set first, before any model
    loads: every caller, a Ray actor too, builds through here (`filter.numerics`); numpy's
    BLAS goes to one thread, so that it does not spin against torch (`filter.host_blas`).
    `lanes` (CPU only; a GPU gets one) loads the networks and the embedder once per lane
    and shares the cores among them (`threads_per_lane`, or an equal share)."""
    verify_mtcnn_weights()
    torch_device = resolve_device(device)
    apply_device_numerics(torch_device)
    single_threaded_numpy_blas()
    lanes = lanes_for(lanes, torch_device)
    if lanes > 1:
        threads = share_cores(lanes, threads_per_lane)
        log.info("filter lanes: %d, each on %d torch and OpenCV threads", lanes, threads)
    settings = detector_settings or DetectorSettings()
    if detector is not None:
        settings = replace(settings, implementation=detector)
    built = []
    for _ in range(lanes):
        model = load_embedder(
            embedder, models_dir, device=str(torch_device), facenet_weights=facenet_weights
        )
        mtcnn = MtcnnDetector(settings, device=torch_device)
        built.append((FaceAligner(mtcnn, model.crop_size), model))
    (aligner, model), *more = built
    return FaceEmbeddingPipeline(aligner, model, device=torch_device, more_lanes=more)


@dataclass(frozen=True)
class EmbeddingSpec:
    """The names and paths that choose an embedding pipeline: small and picklable, so that
    a worker process (a Ray actor) builds exactly the pipeline the command line chose."""

    embedder: str
    models_dir: Path
    device: str = "cpu"
    facenet_weights: Path | None = None
    detector: str | None = None
    # Torch intra-op threads of the process that builds it (None: leave them). MTCNN's
    # float sums depend on it: the same count gives bitwise the same landmarks, crops and
    # embeddings; another gives differences around 1e-4.
    torch_threads: int | None = None
    # Batches checked side by side on the CPU, each in a lane of its own (the server's
    # batches in flight); with several, `torch_threads` is each lane's.
    lanes: int = 1

    def build(self) -> FaceEmbeddingPipeline:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        return build_embedding_pipeline(
            self.embedder,
            self.models_dir,
            device=self.device,
            facenet_weights=self.facenet_weights,
            detector=self.detector,
            lanes=self.lanes,
            threads_per_lane=self.torch_threads,
        )


def detector_manifest(pipeline: FaceEmbeddingPipeline) -> dict[str, object]:
    """The detector settings an index built by this pipeline records (and must match)."""
    detector = pipeline.aligner.detector
    # Any detector carrying DetectorSettings (MtcnnDetector, the fast path's fallback
    # wrapper) records its own; the implementation in them names the one that built it.
    settings = getattr(detector, "settings", None)
    if not isinstance(settings, DetectorSettings):
        settings = DetectorSettings()
    return settings.as_dict()


def load_index_for(pipeline: FaceEmbeddingPipeline, index_path: Path) -> FaissIdentityIndex:
    """Load an index and refuse it unless it was built with this pipeline's embedder and
    detector (and passes the format's integrity checks and self-test)."""
    embedder = pipeline.embedder
    index = FaissIdentityIndex.load(
        index_path,
        expect_embedder=embedder.name,
        expect_model_sha256=embedder.model_sha256,
        expect_dim=embedder.dim,
        expect_detector=detector_manifest(pipeline),
    )
    log.info(
        "identity index %s loaded: fingerprint %s, %d identities, %d face vectors, "
        "%s replica features",
        index_path,
        index.fingerprint,
        index.identity_count,
        index.vector_count,
        index.replicas.count if index.replicas is not None else "no",
    )
    return index


@dataclass(frozen=True)
class OpenedFilter:
    """A filter ready to check images, and what judges them with it."""

    filter: IdentityFilter
    index: FaissIdentityIndex  # the filter's, loaded and checked
    in_force: FilterInForce

    @property
    def thresholds(self) -> Thresholds:
        return self.in_force.thresholds


def open_filter(
    pipeline: FaceEmbeddingPipeline,
    index: Path | FaissIdentityIndex,
    no_face_policy: NoFacePolicy = NoFacePolicy.REJECT,
    *,
    threshold: float | None = None,
    replica_threshold: float | None = None,
) -> OpenedFilter:
    """The filter over `index` (a folder, loaded and checked against this pipeline by
    `load_index_for`, or an index already in memory), with the thresholds in force:
    explicit overrides, else the calibration saved with the index, else the defaults
    (`filter.thresholds.resolve_thresholds`). The caller says which thresholds are in
    force (`in_force.thresholds.describe()`), in its own log or on stderr."""
    if not isinstance(index, FaissIdentityIndex):
        index = load_index_for(pipeline, index)
    in_force = in_force_for(index, threshold, replica_threshold)
    checker = IdentityFilter(pipeline, index, in_force.thresholds.decision, no_face_policy)
    return OpenedFilter(checker, index, in_force)


class MeasuringFilter:
    """Evidence only (calibrate, evaluate, the benches): the nearest identity of each face
    and the nearest training image, with no thresholds resolved, since evidence does not
    depend on them. It has no `check`: a verdict cannot be asked of it by mistake."""

    def __init__(self, pipeline: FaceEmbeddingPipeline, index: FaissIdentityIndex) -> None:
        # The filter underneath is given the strictest thresholds there are, so that even
        # a verdict reached around this class would reject rather than pass.
        strictest = DecisionThresholds(-1.0, -1.0 if index.has_replicas else None)
        self._filter = IdentityFilter(pipeline, index, strictest, NoFacePolicy.REJECT)
        self.index = index

    def evidence(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageEvidence]:
        return self._filter.evidence(images, observer)


def measuring_filter(
    pipeline: FaceEmbeddingPipeline, index: Path | FaissIdentityIndex
) -> MeasuringFilter:
    """The evidence-only filter over `index` (a folder, loaded and checked against this
    pipeline, or an index already in memory, as `evaluate` builds them)."""
    if not isinstance(index, FaissIdentityIndex):
        index = load_index_for(pipeline, index)
    return MeasuringFilter(pipeline, index)
