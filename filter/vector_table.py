"""FAISS tables of unit vectors with their labels: building, searching, and the checks
that refuse a table which would match nothing (foreign metric or dimension, empty, or
failing its self-test). The identity index holds two of them: faces and replicas."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from filter.errors import IndexCorruptError, IndexMismatchError

IndexType = Literal["auto", "flat", "hnsw", "ivf"]

# `auto` is exact search at every size: an approximate index can return a worse neighbour
# than the true one, and a face whose true best match clears the threshold would then
# pass. HNSW and IVF stay available by explicit choice (README "Index at scale" gives
# their recall); exact search over a filter batch is one matrix product.
APPROXIMATE_TYPES = frozenset({"hnsw", "ivf"})
# Search breadth of the approximate types; `make bench` reports latency and recall for
# these and neighbouring values (README "Index at scale").
HNSW_EF_SEARCH = 128
# Candidates re-scored in fp32 after the fp16 GPU product; the true nearest row is among
# them unless that many rows tie within fp16 rounding (~5e-4).
RESCORE_CANDIDATES = 8
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


def choose_index_type(vector_count: int) -> Literal["flat"]:
    return "flat"


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


SELF_TEST_SAMPLE = 64
SELF_TEST_MIN_SIMILARITY = 0.999
# Near-copies of one vector searched to find a row among them (one face enrolled under
# this many names at most).
SELF_TEST_MAX_COPIES = 256


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

        vectors = torch.from_numpy(self.vectors())
        # fp16 to find candidates fast; fp32 to score them, so the threshold means on the
        # GPU exactly what it means where the index was built and calibrated.
        self._device_vectors = vectors.to(device, torch.float16)
        self._device_vectors_exact = vectors.to(device, torch.float32)

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
        exact = self._device_vectors_exact
        q = torch.from_numpy(queries).to(vectors.device)
        k = min(RESCORE_CANDIDATES, vectors.shape[0])
        _, candidates = (q.to(torch.float16) @ vectors.T).topk(k, dim=1)
        # Products and a sum, not a matrix product: no TF32 path can touch the scores the
        # threshold is applied to, whatever the process's settings (filter/numerics.py).
        scores = (q.float()[:, None, :] * exact[candidates]).sum(dim=2)
        best, position = scores.max(dim=1)
        rows = candidates.gather(1, position[:, None])
        return best.cpu().numpy()[:, None], rows.cpu().numpy()

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
        crowded = 0
        for query_row, vector, sims, found in zip(sample, vectors, similarities, rows, strict=True):
            own = self.identities[int(query_row)]
            if any(
                0 <= r < self.count
                and self.identities[int(r)] == own
                and s >= SELF_TEST_MIN_SIMILARITY
                for s, r in zip(sims, found, strict=True)
            ):
                continue
            # More near-copies of this vector than neighbours searched (one group photo
            # enrolled under each of the people in it): its own may rank past them, so
            # the row itself is looked for among all its near-copies.
            if float(sims[-1]) >= SELF_TEST_MIN_SIMILARITY and self._finds_row(
                vector, int(query_row)
            ):
                crowded += 1
                continue
            # The message names the row only: it reaches the server's log, which names
            # no one.
            raise IndexCorruptError(
                f"{folder}: self-test failed: {self.name} row {int(query_row)} does not "
                f"find itself (best similarity {float(sims[0]):.4f}); the index is broken "
                "or foreign. Rebuild it with `facegate index build`"
            )
        # Near-copies are a few faces enrolled under several names; most of the table
        # being copies of a few vectors is a broken one (it would match almost nothing).
        if crowded * 2 > len(sample):
            raise IndexCorruptError(
                f"{folder}: self-test failed: {crowded} of {len(sample)} sampled {self.name} "
                f"rows have more than {neighbours - 1} near-copies; the vectors have "
                "collapsed. Rebuild the index with `facegate index build`"
            )

    def _finds_row(self, vector: np.ndarray, row: int) -> bool:
        """Whether a search among every near-copy of `vector` returns `row` itself."""
        found = min(self.count, SELF_TEST_MAX_COPIES)
        sims, rows = self.index.search(np.ascontiguousarray(vector[None]), found)
        return any(
            int(r) == row and s >= SELF_TEST_MIN_SIMILARITY
            for s, r in zip(sims[0], rows[0], strict=True)
        )
