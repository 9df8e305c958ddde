"""Building an identity index from a training gallery: one subfolder per identity.

Every face of every image is enrolled under its folder's identity, bystanders included:
a person in the background of a training image is in the training data too, and a
generator can reproduce them as well as the main subject. The summary counts them
(`bystander_faces`: the faces beyond the largest one of each image, and the images that
hold any), since each is enrolled under an identity that is not theirs: a match on one
names the folder's identity and its source image. An image with more faces than the
detector's `max_faces` is not enrolled at all (its faces could not all be checked either)
and is listed under `too_many_faces`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filter.errors import FilterError, ImageError
from filter.gallery_files import GalleryListing, gallery_chunks, list_gallery
from filter.identity_filter import FaceEmbeddingPipeline, ImageFaces, embedding_problem
from filter.images import ImageLimits, decode_frames
from filter.index import FaissIdentityIndex
from filter.numerics import compute_manifest
from filter.replica import MIN_REPLICA_IMAGES, ReplicaFeaturizer, frames
from filter.vector_table import IndexType


@dataclass
class GalleryReport:
    identities: int = 0
    images: int = 0
    faces: int = 0
    no_face: list[str] = field(default_factory=list)
    unsearchable: list[str] = field(default_factory=list)
    too_many_faces: list[str] = field(default_factory=list)
    with_bystanders: list[str] = field(default_factory=list)
    bystander_faces: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    empty_identities: list[str] = field(default_factory=list)
    replica_images: int = 0
    ignored: list[dict[str, str]] = field(default_factory=list)  # files not enrolled, and why
    partly_enrolled: list[dict[str, str]] = field(default_factory=list)  # frames left unread

    def name_under(self, gallery: Path) -> None:
        """Name the images listed by their source (relative to GALLERY) by their path."""
        self.no_face = [str(gallery / p) for p in self.no_face]
        self.unsearchable = [str(gallery / p) for p in self.unsearchable]
        self.too_many_faces = [str(gallery / p) for p in self.too_many_faces]
        self.with_bystanders = [str(gallery / p) for p in self.with_bystanders]

    def as_dict(self) -> dict[str, object]:
        return {
            "identities": self.identities,
            "images": self.images,
            "faces": self.faces,
            "main_faces": self.faces - self.bystander_faces,
            "bystander_faces": self.bystander_faces,
            "images_with_bystanders": len(self.with_bystanders),
            "images_no_face": len(self.no_face),
            "images_unsupported_geometry": len(self.unsearchable),
            "images_too_many_faces": len(self.too_many_faces),
            "images_skipped": len(self.skipped),
            "no_face": self.no_face,
            "unsupported_geometry": self.unsearchable,
            "too_many_faces": self.too_many_faces,
            "with_bystanders": self.with_bystanders,
            "skipped": self.skipped,
            "identities_without_faces": self.empty_identities,
            "replica_images": self.replica_images,
            "files_ignored": len(self.ignored),
            "ignored": self.ignored,
            "partly_enrolled": self.partly_enrolled,
        }


@dataclass(frozen=True)
class EnrolledRows:
    vectors: np.ndarray  # face embeddings, one row per face
    identities: list[str]
    sources: list[str]
    frames: np.ndarray  # one working frame per readable image (see filter.replica.frames)
    replica_identities: list[str]
    replica_sources: list[str]


@dataclass(frozen=True)
class DecodedChunk:
    """A chunk of gallery images, decoded: what a worker embeds."""

    identities: list[str]  # of every image in the chunk, readable or not
    skipped: list[dict[str, str]]  # unreadable files and why
    labels: list[tuple[str, str]]  # (identity, source) of each decoded image
    images: list[np.ndarray]
    partly: list[dict[str, str]] = field(default_factory=list)  # frames not read, and why


@dataclass(frozen=True)
class EmbeddedChunk:
    """A chunk of gallery images, embedded: what an enrolment adds (no pixels)."""

    identities: list[str]
    skipped: list[dict[str, str]]
    labels: list[tuple[str, str]]
    results: list[ImageFaces]
    frames: np.ndarray  # replica working frames (filter.replica.frames), in memory only
    partly: list[dict[str, str]] = field(default_factory=list)


def decode_chunk(
    gallery: Path, chunk: Sequence[tuple[str, Path]], limits: ImageLimits | None = None
) -> DecodedChunk:
    """Decode a chunk; unreadable files are skipped and reported (sources are paths
    relative to GALLERY; a file's frames after the first are `PATH#frame=N`)."""
    skipped: list[dict[str, str]] = []
    partly: list[dict[str, str]] = []
    labels: list[tuple[str, str]] = []
    images: list[np.ndarray] = []
    for identity, path in chunk:
        try:
            decoded, unread = decode_frames(path, limits)
        except ImageError as exc:
            skipped.append({"path": str(path), "error": str(exc)})
            continue
        if unread is not None:
            partly.append({"path": str(path), "error": unread})
        source = str(Path(path).relative_to(gallery))
        for number, image in enumerate(decoded, start=1):
            labels.append((identity, source if number == 1 else f"{source}#frame={number}"))
            images.append(image)
    return DecodedChunk([identity for identity, _ in chunk], skipped, labels, images, partly)


def embed_chunk(decoded: DecodedChunk, pipeline: FaceEmbeddingPipeline) -> EmbeddedChunk:
    """Faces, embeddings and replica working frames of a decoded chunk (one model call)."""
    images = decoded.images
    results = pipeline.embed_images(images) if images else []
    return EmbeddedChunk(
        decoded.identities,
        decoded.skipped,
        decoded.labels,
        results,
        frames(images),
        decoded.partly,
    )


class Enrolment:
    """Accumulates training images into an index: every face's embedding under its
    identity, and every image's replica feature (faces or not: a copied training image
    leaks whether or not a detector finds a face in it). Used by `index build` and by the
    demo index, so both enrol exactly alike."""

    def __init__(self, pipeline: FaceEmbeddingPipeline, report: GalleryReport | None = None):
        self.pipeline = pipeline
        self.report = report or GalleryReport()
        self._vectors: list[np.ndarray] = []
        self._identities: list[str] = []
        self._sources: list[str] = []
        self._frames: list[np.ndarray] = []
        self._replica_identities: list[str] = []
        self._replica_sources: list[str] = []
        self._faces_per_identity: dict[str, int] = {}

    def expect_identity(self, identity: str) -> None:
        """Count an identity even if none of its images turns out to hold a face."""
        self._faces_per_identity.setdefault(identity, 0)

    def expect_gallery(self, listing: GalleryListing) -> None:
        """Every identity folder counts, even one with no image; what is not enrolled is
        reported."""
        for identity in listing.identities:
            self.expect_identity(identity)
        self.report.ignored.extend(listing.ignored)

    def add(self, items: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """Enrol (identity, source, RGB image) items, embedded as one batch."""
        if not items:
            return
        images = [image for _, _, image in items]
        labels = [(identity, source) for identity, source, _ in items]
        self.add_embedded(labels, self.pipeline.embed_images(images), frames(images))

    def add_embedded(
        self,
        labels: Sequence[tuple[str, str]],
        results: Sequence[ImageFaces],
        replica_frames: np.ndarray,
    ) -> None:
        """Enrol images already run through this enrolment's pipeline (evaluation reuses
        one embedding of each photo across many leave-one-out indexes)."""
        if not labels:
            return
        self._frames.append(np.asarray(replica_frames, dtype=np.uint8))
        report = self.report
        for (identity, source), result in zip(labels, results, strict=True):
            self.expect_identity(identity)
            report.images += 1
            self._replica_identities.append(identity)
            self._replica_sources.append(source)
            if not result.searchable:
                report.unsearchable.append(source)
            elif result.unsearched_faces:
                report.too_many_faces.append(source)
            elif len(result.faces) == 0:
                report.no_face.append(source)
            else:
                problem = embedding_problem(
                    result.embeddings, len(result.faces), self.pipeline.embedder.dim
                )
                if problem is not None:
                    # An enrolled face that matches nothing would let its person out.
                    raise FilterError(f"{source}: {problem}; refusing to enrol it")
                report.faces += len(result.faces)
                if len(result.faces) > 1:
                    report.bystander_faces += len(result.faces) - 1
                    report.with_bystanders.append(source)
                self._faces_per_identity[identity] += len(result.faces)
                self._vectors.append(result.embeddings)
                self._identities.extend([identity] * len(result.faces))
                self._sources.extend([source] * len(result.faces))

    def add_chunk(self, chunk: EmbeddedChunk) -> None:
        """Enrol one embedded chunk of a gallery (see `decode_chunk`, `embed_chunk`)."""
        for identity in chunk.identities:
            self.expect_identity(identity)
        self.report.skipped.extend(chunk.skipped)
        self.report.partly_enrolled.extend(chunk.partly)
        self.add_embedded(chunk.labels, chunk.results, chunk.frames)

    def faceless_identities(self) -> list[str]:
        """Identities none of whose files gave a face (unreadable, faceless, or none)."""
        return sorted(k for k, n in self._faces_per_identity.items() if n == 0)

    def rows(self) -> EnrolledRows:
        """What was enrolled so far, as rows (faces, and every image's working frame)."""
        dim = self.pipeline.embedder.dim
        return EnrolledRows(
            vectors=np.concatenate(self._vectors) if self._vectors else np.zeros((0, dim)),
            identities=list(self._identities),
            sources=list(self._sources),
            frames=np.concatenate(self._frames) if self._frames else frames([]),
            replica_identities=list(self._replica_identities),
            replica_sources=list(self._replica_sources),
        )

    def build(
        self,
        *,
        detector_settings: dict[str, object],
        index_type: IndexType = "auto",
        salt: bytes | None = None,
    ) -> FaissIdentityIndex:
        report = self.report
        report.identities = sum(1 for n in self._faces_per_identity.values() if n)
        report.empty_identities = self.faceless_identities()
        if not self._vectors:
            raise FilterError(
                f"no face was found in any of the {report.images} readable images; nothing "
                "to enrol (an empty index would release every face)"
            )
        embedder = self.pipeline.embedder
        training_frames = np.concatenate(self._frames)
        featurizer: ReplicaFeaturizer | None = None
        if len(training_frames) >= MIN_REPLICA_IMAGES:
            featurizer = ReplicaFeaturizer.fit(training_frames)
            report.replica_images = len(training_frames)
        return FaissIdentityIndex.build(
            np.concatenate(self._vectors),
            self._identities,
            self._sources,
            embedder_name=embedder.name,
            model_sha256=embedder.model_sha256,
            detector=detector_settings,
            index_type=index_type,
            counts={
                "images": report.images,
                "faces": report.faces,
                "images_no_face": len(report.no_face),
                "bystander_faces": report.bystander_faces,
                "images_unsupported_geometry": len(report.unsearchable),
                "images_too_many_faces": len(report.too_many_faces),
                "images_skipped": len(report.skipped),
            },
            replica_features=None if featurizer is None else featurizer.enrolled(training_frames),
            replica_identities=self._replica_identities if featurizer else (),
            replica_sources=self._replica_sources if featurizer else (),
            replica_featurizer=featurizer,
            salt=salt,
            compute=compute_manifest(self.pipeline.device, embedder),
        )


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
    """Enrol every image of GALLERY/<identity>/ (sources are paths relative to GALLERY)."""
    gallery = Path(gallery)
    enrolment = enrol_gallery(
        gallery, pipeline, limits=limits, batch_size=batch_size, progress=progress
    )
    return finish_gallery_index(
        gallery, enrolment, detector_settings=detector_settings, index_type=index_type
    )


def finish_gallery_index(
    gallery: Path,
    enrolment: Enrolment,
    *,
    detector_settings: dict[str, object],
    index_type: IndexType = "auto",
) -> tuple[FaissIdentityIndex, GalleryReport]:
    """The index of an enrolled gallery, and its report (paths under GALLERY)."""
    try:
        index = enrolment.build(detector_settings=detector_settings, index_type=index_type)
    except FilterError as exc:
        raise FilterError(f"gallery {gallery}: {exc}") from None
    report = enrolment.report
    report.name_under(gallery)
    return index, report


def enrol_gallery(
    gallery: Path,
    pipeline: FaceEmbeddingPipeline,
    *,
    limits: ImageLimits | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> Enrolment:
    """Run every image of GALLERY/<identity>/ through the pipeline (sources are paths
    relative to GALLERY); unreadable files are skipped and reported."""
    gallery = Path(gallery)
    enrolment = Enrolment(pipeline)
    listing = list_gallery(gallery)
    enrolment.expect_gallery(listing)
    for chunk in gallery_chunks(listing, batch_size):
        enrolment.add_chunk(embed_chunk(decode_chunk(gallery, chunk, limits), pipeline))
        if progress is not None:
            progress(len(chunk))
    return enrolment
