"""The identity index: FAISS inner-product indexes over unit-length vectors.

On disk an index is a folder (format 2):
  vectors.faiss         face embeddings (row i is vector i)
  labels.json           for each row: identity id (gallery folder name) and source file
  replicas.faiss        low-frequency features of every enrolled training image
  replica_labels.json   for each replica row: identity id and source file
  calibration.json      optional: thresholds saved by `facegate calibrate --save`
  manifest.json         embedder, detector settings, replica feature, index type,
                        counts, build time, and the size and sha256 of every file above

Loading checks everything in the manifest against the files, the embedder and the
detector in use, refuses foreign FAISS indexes (another metric or dimension) and empty
ones, and runs a self-test: a sample of the index's own vectors must each come back as
their own identity at a similarity near 1. Anything that does not hold is refused
rather than loaded: an index that matches nothing would let every face out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np

from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.models import sha256_file
from filter.replica import PROJECTION_FILE, ReplicaFeaturizer

FORMAT_VERSION = 2
# Format 1 had no replica features, no self-test guarantees and no saved calibration.
VECTORS_FILE = "vectors.faiss"
LABELS_FILE = "labels.json"
REPLICAS_FILE = "replicas.faiss"
REPLICA_LABELS_FILE = "replica_labels.json"
CALIBRATION_FILE = "calibration.json"
MANIFEST_FILE = "manifest.json"

IndexType = Literal["auto", "flat", "hnsw", "ivf"]

# Exact search up to this many vectors; past it a graph index (HNSW) keeps single-query
# latency in the low milliseconds on 2 cores. See README "Index at scale" for the numbers.
FLAT_MAX_VECTORS = 200_000
# Search breadth of the approximate types; `make bench` reports latency and recall for
# these and neighbouring values (README "Index at scale").
HNSW_EF_SEARCH = 128
IVF_NPROBE = 64


@dataclass(frozen=True)
class Match:
    """The nearest indexed vector to one query."""

    similarity: float  # NaN when the search found no neighbour
    identity: str | None  # None when the search found no neighbour

    @property
    def found(self) -> bool:
        return self.identity is not None and math.isfinite(self.similarity)


NO_MATCH = Match(similarity=math.nan, identity=None)


class IdentityIndex(Protocol):
    def search(self, queries: np.ndarray) -> list[Match]:
        """Nearest indexed identity (by cosine similarity) for each unit-length query."""
        ...

    @property
    def has_replicas(self) -> bool:
        """Whether the index holds replica features of its training images."""
        ...

    def search_replicas(self, images: Sequence[np.ndarray]) -> list[Match]:
        """Nearest enrolled training image of each whole image."""
        ...

    @property
    def identity_count(self) -> int: ...

    @property
    def vector_count(self) -> int: ...


def choose_index_type(vector_count: int) -> Literal["flat", "hnsw"]:
    return "flat" if vector_count <= FLAT_MAX_VECTORS else "hnsw"


def make_faiss_index(vectors: np.ndarray, index_type: IndexType) -> Any:
    """Build a FAISS inner-product index of the given type over unit-length rows."""
    dim = vectors.shape[1]
    kind = choose_index_type(len(vectors)) if index_type == "auto" else index_type
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(max(len(vectors), 1))), max(len(vectors) // 39, 1)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a sample: 64 points per list trains as well as all of them, far faster.
        sample = np.random.default_rng(0).permutation(len(vectors))[: 64 * nlist]
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(nlist, IVF_NPROBE)
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    if len(vectors):
        index.add(vectors)
    if kind == "ivf":
        index.make_direct_map()  # reconstruction, for the load self-test and calibration
    return index


def index_kind(index: Any) -> str:
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return type(index).__name__


# Detector settings that change what an embedding means; an index built with other values
# is refused. The minimum face fraction is search scope, not meaning (the generated-output
# fast path searches a subset of the full path's pyramid by design), so it may differ.
DETECTOR_KEYS_EXCLUDED_FROM_MATCH = frozenset({"min_face_fraction"})
SELF_TEST_SAMPLE = 64
SELF_TEST_MIN_SIMILARITY = 0.999


class VectorTable:
    """A FAISS inner-product index over unit rows with an identity and a source per row."""

    def __init__(self, name: str, index: Any, identities: list[str], sources: list[str]) -> None:
        if index.ntotal != len(identities) or len(identities) != len(sources):
            raise IndexCorruptError(
                f"{name}: index has {index.ntotal} vectors but {len(identities)} labels"
            )
        self.name = name
        self.index = index
        self.identities = identities
        self.sources = sources
        self._device_vectors: Any = None  # exact search on a GPU, see use_device()

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def use_device(self, device: str) -> None:
        if not device.startswith("cuda") or self.count == 0:
            return
        import torch

        self._device_vectors = torch.from_numpy(self.vectors()).to(device, torch.float16)

    def vectors(self) -> np.ndarray:
        return np.asarray(self.index.reconstruct_n(0, self.count), dtype=np.float32)

    def search(self, queries: np.ndarray) -> list[Match]:
        """Nearest row for each query; NO_MATCH (NaN, no identity) where there is none.

        A query that is not finite never reaches FAISS: a NaN compares false and could
        hide another query's true neighbour on the GPU path, and FAISS answers it with
        row -1. The caller decides what a missing neighbour means (the filter rejects).
        """
        if len(queries) == 0:
            return []
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"{self.name}: query shape {queries.shape} does not match index dimension "
                f"{self.dim}"
            )
        finite = np.isfinite(queries).all(axis=1)
        similarities = np.full(len(queries), np.nan, dtype=np.float32)
        rows = np.full(len(queries), -1, dtype=np.int64)
        if finite.any() and self.count:
            if self._device_vectors is not None:
                found_sims, found_rows = self._search_on_device(queries[finite])
            else:
                found_sims, found_rows = self.index.search(queries[finite], 1)
            similarities[finite] = found_sims[:, 0]
            rows[finite] = found_rows[:, 0]
        return [
            Match(similarity=float(s), identity=self.identities[int(r)])
            if 0 <= r < self.count and math.isfinite(float(s))
            else NO_MATCH
            for s, r in zip(similarities, rows, strict=True)
        ]

    def _search_on_device(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        vectors = self._device_vectors
        q = torch.from_numpy(queries).to(vectors.device, torch.float16)
        best, rows = (q @ vectors.T).max(dim=1)
        return best.float().cpu().numpy()[:, None], rows.cpu().numpy()[:, None]

    def check_faiss(self, folder: Path, expected_dim: int) -> None:
        """Refuse a FAISS index that is not what this format promises."""
        metric = getattr(self.index, "metric_type", None)
        if metric != faiss.METRIC_INNER_PRODUCT:
            raise IndexMismatchError(
                f"{folder}: {self.name} uses FAISS metric {metric}, not inner product "
                f"({faiss.METRIC_INNER_PRODUCT}); its scores would not be similarities. "
                "Rebuild the index with `facegate index build`"
            )
        if self.dim != expected_dim:
            raise IndexMismatchError(
                f"{folder}: {self.name} holds {self.dim}-d vectors, the manifest says "
                f"{expected_dim}-d; rebuild the index"
            )
        if self.count == 0:
            raise IndexCorruptError(
                f"{folder}: {self.name} holds no vectors; an empty index matches nothing "
                "and would release every face. Rebuild it from a gallery with faces"
            )
        if isinstance(self.index, faiss.IndexIVF):
            self.index.make_direct_map()

    def self_test(self, folder: Path) -> None:
        """A sample of the table's own rows must come back as their own identity at a
        similarity near 1: catches an inverted metric, scaled or scrambled vectors, a
        labels file that does not belong to the vectors, whatever the cause."""
        rng = np.random.default_rng(0)
        sample = np.sort(rng.permutation(self.count)[:SELF_TEST_SAMPLE])
        vectors = np.stack([self.index.reconstruct(int(row)) for row in sample])
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.abs(norms - 1.0) < 1e-3):
            raise IndexCorruptError(
                f"{folder}: {self.name} holds vectors that are not unit length "
                f"(norms {norms.min():.3f}..{norms.max():.3f}); rebuild the index"
            )
        neighbours = min(8, self.count)
        similarities, rows = self.index.search(np.ascontiguousarray(vectors), neighbours)
        for query_row, sims, found in zip(sample, similarities, rows, strict=True):
            own = self.identities[int(query_row)]
            if not any(
                0 <= r < self.count
                and self.identities[int(r)] == own
                and s >= SELF_TEST_MIN_SIMILARITY
                for s, r in zip(sims, found, strict=True)
            ):
                raise IndexCorruptError(
                    f"{folder}: self-test failed: {self.name} row {int(query_row)} "
                    f"({own}) does not find itself (best similarity {float(sims[0]):.4f}); "
                    "the index is broken or foreign. Rebuild it with `facegate index build`"
                )


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
    ) -> FaissIdentityIndex:
        """Build in memory. An index with no face vector is refused: it would match nothing."""
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
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "embedder": {"name": embedder_name, "model_sha256": model_sha256, "dim": dim},
            "detector": detector,
            "replica": replica_manifest,
            "index_type": index_kind(index),
            "similarity": "cosine (inner product of L2-normalised vectors)",
            "counts": {
                "identities": len(set(identities)),
                "vectors": len(identities),
                **(counts or {}),
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
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
        canonical = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

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
        """Nearest enrolled training image of each image (whole image, low frequency)."""
        if self.replicas is None or self.replica_featurizer is None:
            return [NO_MATCH] * len(images)
        if len(images) == 0:
            return []
        return self.replicas.search(self.replica_featurizer.features(images))

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
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
        try:
            written = [VECTORS_FILE, LABELS_FILE]
            faiss.write_index(self.faces.index, str(staging / VECTORS_FILE))
            _write_json(staging / LABELS_FILE, _labels(self.faces))
            if self.replicas is not None and self.replica_featurizer is not None:
                faiss.write_index(self.replicas.index, str(staging / REPLICAS_FILE))
                _write_json(staging / REPLICA_LABELS_FILE, _labels(self.replicas))
                self.replica_featurizer.save(staging)
                written += [REPLICAS_FILE, REPLICA_LABELS_FILE, PROJECTION_FILE]
            if self.calibration is not None:
                _write_json(staging / CALIBRATION_FILE, self.calibration)
                written.append(CALIBRATION_FILE)
            manifest = dict(self.manifest)
            manifest["files"] = {
                name: {
                    "sha256": sha256_file(staging / name),
                    "bytes": (staging / name).stat().st_size,
                }
                for name in written
            }
            _write_json(staging / MANIFEST_FILE, manifest)
            _fsync_dir(staging)
            _swap_in(staging, folder)
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
        manifest = _read_manifest(folder)
        _verify_files(folder, manifest)
        embedder = manifest["embedder"]
        if expect_embedder is not None and embedder.get("name") != expect_embedder:
            raise IndexMismatchError(
                f"index {folder} was built with embedder {embedder.get('name')!r} but the "
                f"embedder in use is {expect_embedder!r}; rebuild the index or change "
                "FACEGATE_EMBEDDER"
            )
        if expect_model_sha256 is not None and embedder.get("model_sha256") != expect_model_sha256:
            raise IndexMismatchError(
                f"index {folder} was built with {embedder.get('name')} model sha256 "
                f"{embedder.get('model_sha256')}, the loaded model is {expect_model_sha256}; "
                "rebuild the index with the current model"
            )
        if expect_dim is not None and embedder.get("dim") != expect_dim:
            raise IndexMismatchError(
                f"index {folder} holds {embedder.get('dim')}-d vectors, the embedder gives "
                f"{expect_dim}-d; rebuild the index"
            )
        if expect_detector is not None:
            _check_detector(folder, manifest.get("detector"), expect_detector)
        faces = _read_table(folder, "face vectors", VECTORS_FILE, LABELS_FILE)
        faces.check_faiss(folder, int(embedder.get("dim", -1)))
        replicas = featurizer = None
        replica_spec = manifest.get("replica")
        if replica_spec is not None:
            if not isinstance(replica_spec, dict):
                raise IndexCorruptError(f"{folder}/{MANIFEST_FILE}: replica must be an object")
            featurizer = ReplicaFeaturizer.load(folder, replica_spec)
            replicas = _read_table(folder, "replica features", REPLICAS_FILE, REPLICA_LABELS_FILE)
            replicas.check_faiss(folder, featurizer.dim)
        calibration = _read_calibration(folder, manifest)
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


def _labels(table: VectorTable) -> list[dict[str, str]]:
    return [
        {"identity": i, "source": s} for i, s in zip(table.identities, table.sources, strict=True)
    ]


def _read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise IdentityIndexError(
            f"identity index {folder} does not exist; build one with "
            "`facegate index build GALLERY --out INDEX`"
        )
    if not manifest_path.is_file():
        raise IndexCorruptError(f"identity index {folder} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise TypeError("the manifest is not a JSON object")
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["embedder"], dict):
            raise TypeError("files and embedder must be objects")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{manifest_path} is not a valid manifest: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexMismatchError(
            f"{folder} has index format {version}, this facegate reads format "
            f"{FORMAT_VERSION} (which adds replica features, a load self-test and a saved "
            "calibration); rebuild it with `facegate index build GALLERY --out "
            f"{folder}` (`make run` rebuilds its demo index by itself)"
        )
    return manifest


def _verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    required = [VECTORS_FILE, LABELS_FILE]
    if manifest.get("replica") is not None:
        required += [REPLICAS_FILE, REPLICA_LABELS_FILE, PROJECTION_FILE]
    for name in required:
        if name not in files:
            raise IndexCorruptError(f"{folder}/{MANIFEST_FILE} lists no {name}")
    for name, expected in files.items():
        if name not in (*required, CALIBRATION_FILE) or not isinstance(expected, dict):
            raise IndexCorruptError(f"{folder}/{MANIFEST_FILE} lists an unknown file {name!r}")
        path = folder / name
        if not path.is_file():
            raise IndexCorruptError(f"identity index {folder} is missing {name}")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise IndexCorruptError(
                f"{path} is {size} bytes, the manifest says {expected.get('bytes')}: "
                "truncated or replaced; rebuild the index"
            )
        if sha256_file(path) != expected.get("sha256"):
            raise IndexCorruptError(
                f"{path} does not match the sha256 in the manifest; rebuild the index"
            )


def _check_detector(folder: Path, built: object, running: dict[str, object]) -> None:
    if not isinstance(built, dict):
        raise IndexMismatchError(f"index {folder} records no detector settings; rebuild it")
    keys = (set(built) | set(running)) - DETECTOR_KEYS_EXCLUDED_FROM_MATCH
    differing = sorted(k for k in keys if _normalised(built.get(k)) != _normalised(running.get(k)))
    if differing:
        shown = ", ".join(
            f"{k}: index {built.get(k)!r} vs running {running.get(k)!r}" for k in differing
        )
        raise IndexMismatchError(
            f"index {folder} was built with other detector settings ({shown}); its "
            "embeddings would not mean what the running filter's do. Rebuild the index "
            "with the running detector (`facegate index build`)"
        )


def _normalised(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _read_table(folder: Path, name: str, vectors_file: str, labels_file: str) -> VectorTable:
    try:
        index = faiss.read_index(str(folder / vectors_file))
    except RuntimeError as exc:
        raise IndexCorruptError(f"cannot read {folder / vectors_file}: {exc}") from None
    try:
        labels = json.loads((folder / labels_file).read_text())
        identities = [str(row["identity"]) for row in labels]
        sources = [str(row["source"]) for row in labels]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{folder / labels_file} is not valid: {exc}") from None
    return VectorTable(name, index, identities, sources)


def _read_calibration(folder: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    if CALIBRATION_FILE not in manifest["files"]:
        return None
    path = folder / CALIBRATION_FILE
    try:
        calibration = json.loads(path.read_text())
        for key in ("threshold", "replica_threshold"):
            value = calibration.get(key)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and -1 <= value <= 1
            ):
                raise ValueError(f"{key} {value!r} is not a similarity in [-1, 1]")
        if not isinstance(calibration.get("threshold"), (int, float)):
            raise ValueError("no threshold")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{path} is not a valid calibration: {exc}") from None
    return dict(calibration)


def _write_json(path: Path, payload: object) -> None:
    with path.open("w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`; a reader sees the old or the new folder, whole."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
