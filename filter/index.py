"""The identity index: FAISS inner-product indexes over unit-length vectors.

On disk an index is a folder (format 3):
  vectors.faiss         face embeddings (row i is vector i)
  labels.json           for each row: identity id (gallery folder name) and source file
  replicas.faiss        replica features (filter/replica.py): one row per enrolled
                        training image
  replica_labels.json   for each replica row: identity id and source file
  calibration.json      optional: thresholds saved by `facegate calibrate --save`
  manifest.json         embedder, detector settings, replica feature, index type,
                        counts, build time, the salt of its seeds, the device and
                        precision that built it ("compute"), and the size and sha256 of
                        every file above

Loading checks everything in the manifest against the files, the embedder and the
detector in use, refuses foreign FAISS indexes (another metric or dimension) and empty
ones, and runs a self-test: a sample of the index's own vectors must each come back as
their own identity at a similarity near 1. Anything that does not hold is refused
rather than loaded: an index that matches nothing would let every face out. The
manifest's own fields and checks are `filter/index_manifest.py`; reading and writing the
files, `filter/index_store.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from filter.errors import IdentityIndexError, IndexCorruptError
from filter.index_manifest import build_manifest, check_manifest, salt_of
from filter.index_store import (
    CALIBRATION_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    REPLICA_LABELS_FILE,
    REPLICAS_FILE,
    VECTORS_FILE,
    IndexSnapshot,
    check_replaceable,
    fsync_dir,
    labels_of,
    read_calibration,
    read_manifest,
    read_table,
    swap_in,
    verify_files,
    write_json,
)
from filter.models import sha256_file
from filter.replica import PROJECTION_FILE, ReplicaFeaturizer
from filter.vector_table import (
    NO_MATCH,
    IndexType,
    Match,
    VectorTable,
    index_kind,
    make_faiss_index,
)

# Reads of a folder that keeps being swapped under the reader before it gives up.
SWAPPED_RETRIES = 5

# Re-exported: callers that name the index's types import them from here.
__all__ = ["NO_MATCH", "FaissIdentityIndex", "IdentityIndex", "IndexType", "Match", "VectorTable"]


class IdentityIndex(Protocol):
    def search(self, queries: np.ndarray) -> list[Match]:
        """Nearest indexed identity (by cosine similarity) for each unit-length query."""
        ...

    @property
    def has_replicas(self) -> bool:
        """Whether the index holds replica features of its training images."""
        ...

    def search_replicas(self, images: Sequence[np.ndarray]) -> list[Match]:
        """Nearest enrolled training image of each whole image, however mirrored, cropped
        or shifted."""
        ...

    @property
    def identity_count(self) -> int: ...

    @property
    def vector_count(self) -> int: ...



def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """The fingerprint of the index whose manifest this is (`FaissIdentityIndex.fingerprint`)."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]

class FaissIdentityIndex:
    """A loaded (or freshly built) index: face embeddings, replica features of the
    enrolled training images, an optional saved calibration, and the manifest."""

    def __init__(
        self,
        index: Any,
        identities: list[str],
        sources: list[str],
        manifest: dict[str, Any],
        replicas: VectorTable | None = None,
        calibration: dict[str, Any] | None = None,
        replica_featurizer: ReplicaFeaturizer | None = None,
    ) -> None:
        if (replicas is None) != (replica_featurizer is None):
            raise IndexCorruptError("replica features and their projection come together")
        self.faces = VectorTable("face vectors", index, identities, sources)
        self.replicas = replicas
        self.replica_featurizer = replica_featurizer
        self.calibration = calibration
        self.manifest = manifest

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        identities: Sequence[str],
        sources: Sequence[str],
        *,
        embedder_name: str,
        model_sha256: str,
        detector: dict[str, object],
        index_type: IndexType = "auto",
        counts: dict[str, int] | None = None,
        replica_features: np.ndarray | None = None,
        replica_identities: Sequence[str] = (),
        replica_sources: Sequence[str] = (),
        replica_featurizer: ReplicaFeaturizer | None = None,
        salt: bytes | None = None,
        compute: dict[str, object] | None = None,
    ) -> FaissIdentityIndex:
        """Build in memory. An index with no face vector is refused: it would match nothing.
        `salt` is the one its seeds were drawn under (`index demo`); None draws a new one.
        `compute` (filter.numerics.compute_manifest) records the device and precision that
        embedded the vectors; a record, not checked at load."""
        if len(identities) == 0:
            raise IdentityIndexError(
                "no face to enrol: an empty identity index would release every face"
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(identities), -1)
        dim = vectors.shape[1]
        index = make_faiss_index(vectors, index_type)
        replicas = None
        replica_manifest: dict[str, object] | None = None
        if replica_featurizer is not None and replica_features is not None:
            features = np.ascontiguousarray(replica_features, dtype=np.float32).reshape(
                len(replica_identities), -1
            )
            unusable = np.flatnonzero(~np.isfinite(features).all(axis=1))
            if len(unusable):
                # FAISS never returns a NaN row: a copy of that image could never match.
                raise IdentityIndexError(
                    f"{len(unusable)} training image(s) have no usable replica feature "
                    f"(first: {replica_sources[int(unusable[0])]}); nothing was written"
                )
            replicas = VectorTable(
                "replica features",
                make_faiss_index(features, index_type),
                list(replica_identities),
                list(replica_sources),
            )
            replica_manifest = {
                **replica_featurizer.spec(),
                "dim": replicas.dim,
                "count": replicas.count,
            }
        manifest = build_manifest(
            identities,
            dim=dim,
            embedder_name=embedder_name,
            model_sha256=model_sha256,
            detector=detector,
            replica=replica_manifest,
            index_type=index_kind(index),
            counts=counts,
            salt=salt,
            compute=compute,
        )
        return cls(
            index,
            list(identities),
            list(sources),
            manifest,
            replicas,
            replica_featurizer=replica_featurizer if replicas is not None else None,
        )

    @property
    def identity_count(self) -> int:
        return len(set(self.faces.identities))

    @property
    def vector_count(self) -> int:
        return self.faces.count

    @property
    def fingerprint(self) -> str:
        """Short digest of the manifest (which holds the sha256 of every file): names the
        exact index that is live, in logs, metrics and batch manifests."""
        return manifest_fingerprint(self.manifest)

    @property
    def salt(self) -> bytes:
        """The salt of this index's seeds; empty for an index built before salts existed."""
        return salt_of(self.manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["embedder"]["dim"])

    def use_device(self, device: str) -> None:
        """Search exactly on a CUDA device: one fp16 GEMM against all vectors (the index's
        own type then only matters on the CPU). A no-op for the CPU."""
        self.faces.use_device(device)
        if self.replicas is not None:
            self.replicas.use_device(device)

    def search(self, queries: np.ndarray) -> list[Match]:
        """Nearest enrolled identity of each face embedding."""
        return self.faces.search(queries)

    @property
    def has_replicas(self) -> bool:
        return self.replicas is not None

    def search_replicas(self, images: Sequence[np.ndarray]) -> list[Match]:
        """Nearest enrolled training image of each image (whole image, low frequency),
        searched through every query view (filter.replica: crops and shifts undone, as it
        is and mirrored) in one call: the best match counts, less its view's margin. A view
        whose search finds no neighbour makes the image's match NO_MATCH (the filter
        rejects it)."""
        if self.replicas is None or self.replica_featurizer is None:
            return [NO_MATCH] * len(images)
        if len(images) == 0:
            return []
        queries = self.replica_featurizer.queries(images)
        views = queries.shape[1]
        margins = self.replica_featurizer.view_margins()
        found = self.replicas.search(queries.reshape(len(images) * views, -1))
        out: list[Match] = []
        for start in range(0, len(found), views):
            matches = found[start : start + views]
            if not all(match.found for match in matches):
                out.append(NO_MATCH)
                continue
            scores = [
                m.similarity - float(margin) for m, margin in zip(matches, margins, strict=True)
            ]
            best = int(np.argmax(scores))
            out.append(Match(similarity=scores[best], identity=matches[best].identity))
        return out

    def source_of(self, row: int) -> str:
        return self.faces.sources[row]

    def vectors(self) -> np.ndarray:
        """All indexed face vectors (reconstructed); for calibration and tests."""
        return self.faces.vectors()

    def with_calibration(self, calibration: dict[str, Any]) -> FaissIdentityIndex:
        """The same index carrying a calibration; `save` writes it, covered by the manifest."""
        twin = object.__new__(FaissIdentityIndex)
        twin.faces, twin.replicas, twin.manifest = self.faces, self.replicas, dict(self.manifest)
        twin.replica_featurizer = self.replica_featurizer
        twin.calibration = dict(calibration)
        return twin

    def save(self, folder: Path) -> None:
        """Write the index atomically: a staging folder, then a rename over the target."""
        folder = Path(folder)
        check_replaceable(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
        try:
            written = [VECTORS_FILE, LABELS_FILE]
            faiss.write_index(self.faces.index, str(staging / VECTORS_FILE))
            write_json(staging / LABELS_FILE, labels_of(self.faces))
            if self.replicas is not None and self.replica_featurizer is not None:
                faiss.write_index(self.replicas.index, str(staging / REPLICAS_FILE))
                write_json(staging / REPLICA_LABELS_FILE, labels_of(self.replicas))
                self.replica_featurizer.save(staging)
                written += [REPLICAS_FILE, REPLICA_LABELS_FILE, PROJECTION_FILE]
            if self.calibration is not None:
                write_json(staging / CALIBRATION_FILE, self.calibration)
                written.append(CALIBRATION_FILE)
            manifest = dict(self.manifest)
            manifest["files"] = {
                name: {
                    "sha256": sha256_file(staging / name),
                    "bytes": (staging / name).stat().st_size,
                }
                for name in written
            }
            write_json(staging / MANIFEST_FILE, manifest)
            fsync_dir(staging)
            swap_in(staging, folder)
            self.manifest = manifest
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        expect_embedder: str | None = None,
        expect_model_sha256: str | None = None,
        expect_dim: int | None = None,
        expect_detector: dict[str, object] | None = None,
    ) -> FaissIdentityIndex:
        folder = Path(folder)
        # One snapshot of the folder: a swap or an edit while it loads cannot mix two
        # versions, and a file that vanishes is a clean error (index_store). A folder
        # swapped (and its old files removed) mid-read is read again from the path.
        for attempt in range(1, SWAPPED_RETRIES + 1):
            with IndexSnapshot(folder) as snapshot:
                try:
                    return cls._load(
                        snapshot,
                        expect_embedder=expect_embedder,
                        expect_model_sha256=expect_model_sha256,
                        expect_dim=expect_dim,
                        expect_detector=expect_detector,
                    )
                except IndexCorruptError:
                    if attempt == SWAPPED_RETRIES or not snapshot.replaced():
                        raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(
        cls,
        snapshot: IndexSnapshot,
        *,
        expect_embedder: str | None,
        expect_model_sha256: str | None,
        expect_dim: int | None,
        expect_detector: dict[str, object] | None,
    ) -> FaissIdentityIndex:
        folder = snapshot.folder
        manifest = read_manifest(snapshot)
        verify_files(snapshot, manifest)
        check_manifest(
            folder,
            manifest,
            expect_embedder=expect_embedder,
            expect_model_sha256=expect_model_sha256,
            expect_dim=expect_dim,
            expect_detector=expect_detector,
        )
        faces = read_table(snapshot, "face vectors", VECTORS_FILE, LABELS_FILE)
        faces.check_faiss(folder, int(manifest["embedder"].get("dim", -1)))
        replicas = featurizer = None
        replica_spec = manifest.get("replica")
        if replica_spec is not None:
            if not isinstance(replica_spec, dict):
                raise IndexCorruptError(f"{folder}/{MANIFEST_FILE}: replica must be an object")
            featurizer = ReplicaFeaturizer.load(
                snapshot.open(PROJECTION_FILE), replica_spec, folder / PROJECTION_FILE
            )
            replicas = read_table(snapshot, "replica features", REPLICAS_FILE, REPLICA_LABELS_FILE)
            replicas.check_faiss(folder, featurizer.dim)
        calibration = read_calibration(snapshot, manifest)
        loaded = cls(
            faces.index,
            faces.identities,
            faces.sources,
            manifest,
            replicas,
            calibration,
            replica_featurizer=featurizer,
        )
        loaded.faces.self_test(folder)
        if replicas is not None:
            replicas.self_test(folder)
        return loaded
