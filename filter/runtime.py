"""Assembles the filter from names and paths: the one place that wires models together,
so the CLI, the index builder, calibration and the server all get the same pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from filter.decide import DecisionThresholds, NoFacePolicy
from filter.embedders import load_embedder, resolve_device
from filter.errors import IndexMismatchError
from filter.faces import DetectorSettings, FaceAligner, MtcnnDetector
from filter.host_blas import single_threaded_numpy_blas
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.index import FaissIdentityIndex
from filter.models import verify_mtcnn_weights
from filter.numerics import apply_device_numerics
from filter.replica import DEFAULT_REPLICA_THRESHOLD, MIN_REPLICA_IMAGES

log = logging.getLogger(__name__)

# Cosine threshold of SFace on real photos; the evidence is in README "Threshold". Other
# embedders and generated galleries need `facegate calibrate --save`.
DEFAULT_IDENTITY_THRESHOLD = 0.40


def build_embedding_pipeline(
    embedder: str,
    models_dir: Path,
    device: str = "cpu",
    facenet_weights: Path | None = None,
    detector_settings: DetectorSettings | None = None,
    detector: str | None = None,
) -> FaceEmbeddingPipeline:
    """`detector` (FACEGATE_DETECTOR, --detector) picks the MTCNN implementation; None
    keeps the one in `detector_settings`, whose default is the batched one. On a CUDA
    device the process's floating-point policy (TF32 off) is set first, before any model
    loads: every caller, a Ray actor too, builds through here (`filter.numerics`); numpy's
    BLAS goes to one thread, so that it does not spin against torch (`filter.host_blas`)."""
    verify_mtcnn_weights()
    torch_device = resolve_device(device)
    apply_device_numerics(torch_device)
    single_threaded_numpy_blas()
    model = load_embedder(
        embedder, models_dir, device=str(torch_device), facenet_weights=facenet_weights
    )
    settings = detector_settings or DetectorSettings()
    if detector is not None:
        settings = replace(settings, implementation=detector)
    mtcnn = MtcnnDetector(settings, device=torch_device)
    return FaceEmbeddingPipeline(FaceAligner(mtcnn, model.crop_size), model, device=torch_device)


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


def load_identity_filter(
    pipeline: FaceEmbeddingPipeline,
    index_path: Path,
    no_face_policy: NoFacePolicy,
    *,
    threshold: float | None = None,
    replica_threshold: float | None = None,
) -> IdentityFilter:
    """The filter over the index at `index_path`, with the thresholds in force (explicit
    overrides, else the calibration saved with the index, else the defaults), logged."""
    index = load_index_for(pipeline, index_path)
    thresholds = resolve_thresholds(index, threshold, replica_threshold)
    log.info("thresholds in force: %s", thresholds.describe())
    return IdentityFilter(pipeline, index, thresholds.decision, no_face_policy)


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force and where each came from (logged at startup)."""

    identity: float
    identity_source: str  # "override", "index calibration" or "default"
    replica: float | None  # None: the index has no replica features
    replica_source: str | None

    @property
    def decision(self) -> DecisionThresholds:
        return DecisionThresholds(identity=self.identity, replica=self.replica)

    def describe(self) -> str:
        text = f"identity {self.identity} ({self.identity_source})"
        if self.replica is None:
            return text + ", replica off (the index has no replica features)"
        return text + f", replica {self.replica} ({self.replica_source})"


def resolve_thresholds(
    index: FaissIdentityIndex,
    identity_override: float | None = None,
    replica_override: float | None = None,
) -> Thresholds:
    """An explicit threshold (flag or FACEGATE_*THRESHOLD) wins; then the calibration saved
    with the index; then the built-in default."""
    saved = index.calibration or {}

    def pick(override: float | None, key: str, default: float) -> tuple[float, str]:
        if override is not None:
            return float(override), "override"
        if saved.get(key) is not None:
            return float(saved[key]), "index calibration"
        return default, "default"

    identity, identity_source = pick(identity_override, "threshold", DEFAULT_IDENTITY_THRESHOLD)
    if not index.has_replicas:
        if replica_override is not None:
            # The operator asked for a signal this index cannot give: say so, don't ignore it.
            raise IndexMismatchError(
                f"a replica threshold ({replica_override}) is set, but the index has no "
                f"replica features (they need at least {MIN_REPLICA_IMAGES} training "
                "images); unset FACEGATE_REPLICA_THRESHOLD / --replica-threshold, or "
                "rebuild the index from a larger gallery"
            )
        return Thresholds(identity, identity_source, None, None)
    replica, replica_source = pick(replica_override, "replica_threshold", DEFAULT_REPLICA_THRESHOLD)
    return Thresholds(identity, identity_source, replica, replica_source)
