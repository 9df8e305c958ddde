"""The identity index: a FAISS inner-product index over unit-length embeddings.

On disk an index is a folder:
  vectors.faiss   the FAISS index (row i is vector i)
  labels.json     for each row: identity id (gallery folder name) and source file
  manifest.json   embedder name, model sha256, dimension, detector settings,
                  index type, counts, build time and sha256 of the two files above

Loading checks everything in the manifest against the files and the embedder in
use, and refuses anything that does not match rather than loading silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np

from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.models import sha256_file

FORMAT_VERSION = 1
VECTORS_FILE = "vectors.faiss"
LABELS_FILE = "labels.json"
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

    similarity: float
    identity: str | None  # None when the index is empty


class IdentityIndex(Protocol):
    def search(self, queries: np.ndarray) -> list[Match]:
        """Nearest indexed identity (by cosine similarity) for each unit-length query."""
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
    return index


def index_kind(index: Any) -> str:
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return type(index).__name__


class FaissIdentityIndex:
    """A loaded (or freshly built) index with its labels and manifest."""

    def __init__(
        self, index: Any, identities: list[str], sources: list[str], manifest: dict[str, Any]
    ) -> None:
        if index.ntotal != len(identities) or len(identities) != len(sources):
            raise IndexCorruptError(
                f"index has {index.ntotal} vectors but {len(identities)} labels"
            )
        self._index = index
        self._identities = identities
        self._sources = sources
        self.manifest = manifest
        # FAISS search is thread-safe for reads, but HNSW efSearch changes are not.
        self._lock = threading.Lock()
        self._device_vectors: Any = None  # exact search on a GPU, see use_device()

    def use_device(self, device: str) -> None:
        """Search exactly on a CUDA device: one fp16 GEMM against all vectors (the index's
        own type then only matters on the CPU). A no-op for the CPU."""
        if not device.startswith("cuda") or self.vector_count == 0:
            return
        import torch

        self._device_vectors = torch.from_numpy(self.vectors()).to(device, torch.float16)

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
    ) -> FaissIdentityIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(identities), -1)
        dim = vectors.shape[1] if len(vectors) else 0
        index = make_faiss_index(vectors, index_type) if dim else faiss.IndexFlatIP(1)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "embedder": {"name": embedder_name, "model_sha256": model_sha256, "dim": dim},
            "detector": detector,
            "index_type": index_kind(index),
            "similarity": "cosine (inner product of L2-normalised embeddings)",
            "counts": {
                "identities": len(set(identities)),
                "vectors": len(identities),
                **(counts or {}),
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return cls(index, list(identities), list(sources), manifest)

    @property
    def identity_count(self) -> int:
        return len(set(self._identities))

    @property
    def fingerprint(self) -> str:
        """Short digest of the manifest (which holds the sha256 of every file): names the
        exact index that is live, in logs, metrics and batch manifests."""
        canonical = json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def vector_count(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.manifest["embedder"]["dim"])

    def search(self, queries: np.ndarray) -> list[Match]:
        if len(queries) == 0:
            return []
        if self.vector_count == 0:
            return [Match(similarity=-1.0, identity=None) for _ in range(len(queries))]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query dimension {queries.shape[1]} does not match index dimension {self.dim}"
            )
        if self._device_vectors is not None:
            similarities, rows = self._search_on_device(queries)
        else:
            similarities, rows = self._index.search(queries, 1)
        return [
            Match(similarity=float(s), identity=self._identities[int(r)])
            if r >= 0
            else Match(similarity=-1.0, identity=None)
            for s, r in zip(similarities[:, 0], rows[:, 0], strict=True)
        ]

    def _search_on_device(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        vectors = self._device_vectors
        q = torch.from_numpy(queries).to(vectors.device, torch.float16)
        best, rows = (q @ vectors.T).max(dim=1)
        return (
            best.float().cpu().numpy()[:, None],
            rows.cpu().numpy()[:, None],
        )

    def source_of(self, row: int) -> str:
        return self._sources[row]

    def vectors(self) -> np.ndarray:
        """All indexed vectors (reconstructed); for calibration and tests."""
        return np.asarray(self._index.reconstruct_n(0, self.vector_count), dtype=np.float32)

    def save(self, folder: Path) -> None:
        """Write the index atomically: a staging folder, then a rename over the target."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
        try:
            faiss.write_index(self._index, str(staging / VECTORS_FILE))
            labels = [
                {"identity": i, "source": s}
                for i, s in zip(self._identities, self._sources, strict=True)
            ]
            _write_json(staging / LABELS_FILE, labels)
            manifest = dict(self.manifest)
            manifest["files"] = {
                name: {
                    "sha256": sha256_file(staging / name),
                    "bytes": (staging / name).stat().st_size,
                }
                for name in (VECTORS_FILE, LABELS_FILE)
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
    ) -> FaissIdentityIndex:
        folder = Path(folder)
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
            files = manifest["files"]
            embedder = manifest["embedder"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(f"{manifest_path} is not a valid manifest: {exc}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"{folder} has index format {manifest.get('format_version')}, "
                f"this facegate reads format {FORMAT_VERSION}; rebuild the index"
            )
        for name in (VECTORS_FILE, LABELS_FILE):
            path = folder / name
            if not path.is_file():
                raise IndexCorruptError(f"identity index {folder} is missing {name}")
            expected = files.get(name, {})
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
        if expect_dim is not None and embedder.get("dim") not in (expect_dim, 0):
            raise IndexMismatchError(
                f"index {folder} holds {embedder.get('dim')}-d vectors, the embedder gives "
                f"{expect_dim}-d"
            )
        try:
            index = faiss.read_index(str(folder / VECTORS_FILE))
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read {folder / VECTORS_FILE}: {exc}") from None
        try:
            labels = json.loads((folder / LABELS_FILE).read_text())
            identities = [str(row["identity"]) for row in labels]
            sources = [str(row["source"]) for row in labels]
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(f"{folder / LABELS_FILE} is not valid: {exc}") from None
        return cls(index, identities, sources, manifest)


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
