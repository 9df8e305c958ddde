"""Assembles the filter from names and paths: the one place that wires models together,
so the CLI, the index builder, calibration and the server all get the same pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filter.decide import NoFacePolicy
from filter.embedders import load_embedder, resolve_device
from filter.faces import DetectorSettings, FaceAligner, MtcnnDetector
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.index import FaissIdentityIndex
from filter.models import verify_mtcnn_weights


def build_embedding_pipeline(
    embedder: str,
    models_dir: Path,
    device: str = "cpu",
    facenet_weights: Path | None = None,
    detector_settings: DetectorSettings | None = None,
) -> FaceEmbeddingPipeline:
    verify_mtcnn_weights()
    torch_device = resolve_device(device)
    model = load_embedder(
        embedder, models_dir, device=str(torch_device), facenet_weights=facenet_weights
    )
    detector = MtcnnDetector(detector_settings or DetectorSettings(), device=torch_device)
    return FaceEmbeddingPipeline(FaceAligner(detector, model.crop_size), model)


def load_index_for(pipeline: FaceEmbeddingPipeline, index_path: Path) -> FaissIdentityIndex:
    """Load an index and refuse it unless it was built with this pipeline's embedder."""
    embedder = pipeline.embedder
    return FaissIdentityIndex.load(
        index_path,
        expect_embedder=embedder.name,
        expect_model_sha256=embedder.model_sha256,
        expect_dim=embedder.dim,
    )


def load_identity_filter(
    pipeline: FaceEmbeddingPipeline,
    index_path: Path,
    threshold: float,
    no_face_policy: NoFacePolicy,
) -> IdentityFilter:
    return IdentityFilter(pipeline, load_index_for(pipeline, index_path), threshold, no_face_policy)


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force and where they came from (logged at startup)."""

    identity: float
    source: str  # "override", "index calibration" or "default"


def resolve_thresholds(
    index: FaissIdentityIndex, override: float | None, default: float
) -> Thresholds:
    """An explicit threshold (flag or FACEGATE_THRESHOLD) wins; then the calibration saved
    with the index; then the built-in default."""
    if override is not None:
        return Thresholds(identity=override, source="override")
    saved = index.manifest.get("calibration")
    if isinstance(saved, dict) and "threshold" in saved:
        return Thresholds(identity=float(saved["threshold"]), source="index calibration")
    return Thresholds(identity=default, source="default")
