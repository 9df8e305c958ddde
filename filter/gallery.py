"""Building an identity index from a training gallery: one subfolder per identity."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filter.errors import FilterError, ImageError
from filter.identity_filter import FaceEmbeddingPipeline
from filter.images import ImageLimits, decode_image, list_images
from filter.index import FaissIdentityIndex, IndexType


@dataclass
class GalleryReport:
    identities: int = 0
    images: int = 0
    faces: int = 0
    no_face: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    empty_identities: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "identities": self.identities,
            "images": self.images,
            "faces": self.faces,
            "images_no_face": len(self.no_face),
            "images_skipped": len(self.skipped),
            "no_face": self.no_face,
            "skipped": self.skipped,
            "identities_without_faces": self.empty_identities,
        }


def gallery_images(gallery: Path) -> Iterator[tuple[str, Path]]:
    """(identity, image path) for every image, identities and files in sorted order."""
    gallery = Path(gallery)
    if not gallery.is_dir():
        raise FilterError(f"gallery {gallery} is not a folder")
    folders = sorted(p for p in gallery.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FilterError(f"gallery {gallery} has no identity subfolders (one per identity)")
    for folder in folders:
        for path in list_images(folder):
            yield folder.name, path


def build_gallery_index(
    gallery: Path,
    pipeline: FaceEmbeddingPipeline,
    *,
    detector_settings: dict[str, object],
    index_type: IndexType = "auto",
    limits: ImageLimits | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[FaissIdentityIndex, GalleryReport]:
    """Enrol every face of every gallery image (bystanders are people too)."""
    report = GalleryReport()
    items = list(gallery_images(gallery))
    vectors: list[np.ndarray] = []
    identities: list[str] = []
    sources: list[str] = []
    faces_per_identity: dict[str, int] = {}
    gallery = Path(gallery)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        decoded: list[tuple[str, str, np.ndarray]] = []
        for identity, path in chunk:
            faces_per_identity.setdefault(identity, 0)
            relative = str(path.relative_to(gallery))
            try:
                decoded.append((identity, relative, decode_image(path, limits)))
            except ImageError as exc:
                report.skipped.append({"path": str(path), "error": str(exc)})
        results = pipeline.embed_images([image for _, _, image in decoded])
        for (identity, relative, _), result in zip(decoded, results, strict=True):
            report.images += 1
            if len(result.faces) == 0:
                report.no_face.append(str(gallery / relative))
                continue
            report.faces += len(result.faces)
            faces_per_identity[identity] += len(result.faces)
            vectors.append(result.embeddings)
            identities.extend([identity] * len(result.faces))
            sources.extend([relative] * len(result.faces))
        if progress is not None:
            progress(len(chunk))
    report.identities = sum(1 for n in faces_per_identity.values() if n)
    report.empty_identities = sorted(k for k, n in faces_per_identity.items() if n == 0)
    embedder = pipeline.embedder
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    index = FaissIdentityIndex.build(
        matrix,
        identities,
        sources,
        embedder_name=embedder.name,
        model_sha256=embedder.model_sha256,
        detector=detector_settings,
        index_type=index_type,
        counts={
            "images": report.images,
            "faces": report.faces,
            "images_no_face": len(report.no_face),
            "images_skipped": len(report.skipped),
        },
    )
    if index.vector_count:
        index.manifest["embedder"]["dim"] = embedder.dim
    return index, report
