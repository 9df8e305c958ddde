"""Enrolment without a rebuild: add a gallery's identities to an index, or remove some.

Both keep the two tables of the format in step: face rows (one per enrolled face) and
replica rows (one per enrolled image, face or not), under the same identity ids. Added
images are projected with the index's own replica projection, so old and new replica
rows are comparable; removal keeps the projection (fitted on a superset, still valid).

The calibration saved with the index is carried forward by both: an edit never loosens
the filter (filter.index_lineage). Removing identities can only lower a non-member's
highest similarity to the index, so the measured false-reject rate stays an upper bound;
adding identities can raise it, so the same thresholds reject more: stricter, never
looser, and the report says to recalibrate (`facegate calibrate --save`) to get back to
the target rate. The edit history records counts and keyed hashes, never identity labels.

The edited index is rebuilt in memory with the same FAISS type and self-tested like a
loaded one; `filter.index_release.publish` then writes it so that a reader, such as a
server reloading, sees the old index or the new one, whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from filter.errors import FilterError
from filter.gallery import GalleryReport, enrol_gallery
from filter.identity_filter import FaceEmbeddingPipeline
from filter.images import ImageLimits
from filter.index import FaissIdentityIndex, IndexType
from filter.index_lineage import (
    carried_calibration,
    edit_record,
    edited_manifest,
    identity_hashes,
)
from filter.index_manifest import new_salt
from filter.numerics import compute_manifest
from filter.replica import MIN_REPLICA_IMAGES

CALIBRATION_KEPT_REMOVE = (
    "kept: removing identities can only lower non-members' similarity to the index, so the "
    "measured false-reject rate stays an upper bound"
)
CALIBRATION_CARRIED_ADD = (
    "carried: the thresholds stay, so nothing loosens; with more identities they may reject "
    "more than the measured rate: recalibrate (`facegate calibrate --index {index} ... "
    "--save`) to get back to the target"
)

# A faces-only index (built from fewer than MIN_REPLICA_IMAGES images) cannot gain a
# replica signal by adding images: its projection would have to be fitted on the old
# training images, which the index does not keep (only their projected features).
NO_REPLICA_SIGNAL = (
    f"off: the index has no replica signal (built from fewer than {MIN_REPLICA_IMAGES} "
    "images); rebuild it from the whole gallery with `facegate index build` to get one"
)


@dataclass
class EditReport:
    operation: str  # "add" or "remove"
    fingerprint_before: str
    fingerprint_after: str = ""
    identities_new: list[str] = field(default_factory=list)
    identities_extended: list[str] = field(default_factory=list)
    identities_removed: int = 0  # a count: the report names no removed identity
    identity_hashes: list[str] | None = None  # keyed hashes of the removed (with a key)
    face_rows: dict[str, int] = field(default_factory=dict)  # before, after
    replica_rows: dict[str, int] = field(default_factory=dict)
    calibration: str = "none saved"
    replicas: str = "in step"
    gallery: GalleryReport | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "operation": self.operation,
            "fingerprint_before": self.fingerprint_before,
            "fingerprint_after": self.fingerprint_after,
            "identities_new": self.identities_new,
            "identities_extended": self.identities_extended,
            "identities_removed": self.identities_removed,
            "identity_hashes": self.identity_hashes,
            "face_rows": self.face_rows,
            "replica_rows": self.replica_rows,
            "calibration": self.calibration,
            "replicas": self.replicas,
        }
        if self.gallery is not None:
            out["gallery"] = self.gallery.as_dict()
        return out


def add_gallery(
    index: FaissIdentityIndex,
    pipeline: FaceEmbeddingPipeline,
    gallery: Path,
    *,
    limits: ImageLimits | None = None,
    progress: Callable[[int], None] | None = None,
    index_name: str = "INDEX",
    key: bytes | None = None,
) -> tuple[FaissIdentityIndex, EditReport]:
    """Enrol every image of GALLERY/<identity>/ into a copy of `index`. The pipeline must
    be the one the index was built with (load it with `load_index_for`). `key`: the
    operator's secret, for keyed hashes in the edit history (None: counts only)."""
    enrolment = enrol_gallery(gallery, pipeline, limits=limits, progress=progress)
    rows = enrolment.rows()
    report = EditReport("add", index.fingerprint, gallery=enrolment.report)
    if not rows.identities:
        raise FilterError(
            f"gallery {gallery}: no face found in any of its {enrolment.report.images} "
            "readable images; nothing to add"
        )
    existing = set(index.faces.identities)
    added = sorted(set(rows.identities))
    report.identities_new = [i for i in added if i not in existing]
    report.identities_extended = [i for i in added if i in existing]
    report.gallery = enrolment.report
    report.gallery.identities = len(added)
    # From every identity folder, not only those with a readable image: an opt-out whose
    # only photo cannot be read is enrolled as nothing, and must be named.
    report.gallery.empty_identities = enrolment.faceless_identities()
    report.gallery.name_under(Path(gallery))
    replicas = index.replicas
    featurizer = index.replica_featurizer
    replica_parts: dict[str, Any] = {}
    if replicas is not None and featurizer is not None:
        replica_parts = {
            "replica_features": np.concatenate(
                [replicas.vectors(), featurizer.enrolled(rows.frames)]
            ),
            "replica_identities": [*replicas.identities, *rows.replica_identities],
            "replica_sources": [*replicas.sources, *rows.replica_sources],
        }
    edited = _rebuild(
        index,
        np.concatenate([index.vectors(), rows.vectors.astype(np.float32)]),
        [*index.faces.identities, *rows.identities],
        [*index.faces.sources, *rows.sources],
        replica_parts,
        record=edit_record("add", added, index.fingerprint, key),
        key=key,
    )
    # The added faces' own compute record; the index keeps its original one.
    edited.manifest["edits"][-1]["compute"] = compute_manifest(pipeline.device, pipeline.embedder)
    if index.calibration is not None:
        edited = edited.with_calibration(
            carried_calibration(index.calibration, "add", index.fingerprint)
        )
        report.calibration = CALIBRATION_CARRIED_ADD.format(index=index_name)
    if not replica_parts:
        report.replicas = NO_REPLICA_SIGNAL
    return _finish(index, edited, report)


def remove_identities(
    index: FaissIdentityIndex, identities: Sequence[str], key: bytes | None = None
) -> tuple[FaissIdentityIndex, EditReport]:
    """A copy of `index` without any face or replica row of these identities; its
    manifest records how many were removed and, with `key`, their keyed hashes."""
    wanted = sorted(set(identities))
    known = set(index.faces.identities) | set(
        index.replicas.identities if index.replicas is not None else ()
    )
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise FilterError(f"not enrolled in this index: {', '.join(unknown)}")
    drop = set(wanted)
    keep = [row for row, i in enumerate(index.faces.identities) if i not in drop]
    if not keep:
        raise FilterError(
            "removing these identities would leave no face in the index; an empty index "
            "matches nothing and would release every face. Build a new index instead"
        )
    vectors = index.vectors()[keep]
    replica_parts: dict[str, Any] = {}
    replicas = index.replicas
    if replicas is not None:
        keep_replicas = [row for row, i in enumerate(replicas.identities) if i not in drop]
        replica_parts = {
            "replica_features": replicas.vectors()[keep_replicas],
            "replica_identities": [replicas.identities[r] for r in keep_replicas],
            "replica_sources": [replicas.sources[r] for r in keep_replicas],
        }
    edited = _rebuild(
        index,
        vectors,
        [index.faces.identities[r] for r in keep],
        [index.faces.sources[r] for r in keep],
        replica_parts,
        record=edit_record("remove", wanted, index.fingerprint, key),
        key=key,
    )
    report = EditReport(
        "remove",
        index.fingerprint,
        identities_removed=len(wanted),
        identity_hashes=identity_hashes(wanted, key),
    )
    if not replica_parts:
        report.replicas = NO_REPLICA_SIGNAL
    if index.calibration is not None:
        edited = edited.with_calibration(
            carried_calibration(index.calibration, "remove", index.fingerprint)
        )
        report.calibration = CALIBRATION_KEPT_REMOVE
    return _finish(index, edited, report)


def _rebuild(
    index: FaissIdentityIndex,
    vectors: np.ndarray,
    identities: list[str],
    sources: list[str],
    replica_parts: dict[str, Any],
    record: dict[str, Any],
    key: bytes | None,
) -> FaissIdentityIndex:
    manifest = index.manifest
    embedder = manifest["embedder"]
    kind = manifest.get("index_type")
    index_type: IndexType = kind if kind in ("flat", "hnsw", "ivf") else "auto"
    counts = {
        k: v
        for k, v in manifest.get("counts", {}).items()
        if k not in ("identities", "vectors", "images", "faces", "bystander_faces")
    }
    counts["faces"] = len(identities)
    if replica_parts:
        counts["images"] = len(replica_parts["replica_identities"])
    edited = FaissIdentityIndex.build(
        vectors,
        identities,
        sources,
        embedder_name=str(embedder["name"]),
        model_sha256=str(embedder["model_sha256"]),
        detector=dict(manifest["detector"]),
        index_type=index_type,
        counts=counts,
        replica_featurizer=index.replica_featurizer if replica_parts else None,
        # Membership changed: a new salt, so that every seed meets new candidates and
        # replaying seeds across the edit tells nothing about who was added or removed.
        salt=new_salt(),
        **replica_parts,
    )
    edited.manifest = edited_manifest(manifest, edited.manifest, record, key)
    return edited


def _finish(
    before: FaissIdentityIndex, edited: FaissIdentityIndex, report: EditReport
) -> tuple[FaissIdentityIndex, EditReport]:
    """Refuse an edited index that would not load, before anything is written."""
    folder = Path("<edited index>")
    edited.faces.check_faiss(folder, before.dim)
    edited.faces.self_test(folder)
    if edited.replicas is not None and edited.replica_featurizer is not None:
        edited.replicas.check_faiss(folder, edited.replica_featurizer.dim)
        edited.replicas.self_test(folder)
    report.face_rows = {"before": before.faces.count, "after": edited.faces.count}
    if before.replicas is not None and edited.replicas is not None:
        report.replica_rows = {"before": before.replicas.count, "after": edited.replicas.count}
    return edited, report
