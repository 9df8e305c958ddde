"""FAISS at scale: single-query latency and match recall of each index type against
exact search, on synthetic clustered unit vectors (SFace's 128 dimensions)."""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from bench.common import emit
from filter.vector_table import make_faiss_index

DIM = 128
PER_IDENTITY = 5
NOISE = 0.73  # same-identity cosine ~ 1 / (1 + NOISE^2) ~ 0.65, like real SFace pairs
THRESHOLD = 0.40


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n // PER_IDENTITY, DIM)))
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (NOISE / np.sqrt(DIM))
    vectors = _unit(np.repeat(centres, PER_IDENTITY, axis=0) + noise)
    members = centres[rng.integers(0, len(centres), queries // 2)]
    member_queries = _unit(members + rng.standard_normal(members.shape) * (NOISE / np.sqrt(DIM)))
    strangers = _unit(rng.standard_normal((queries - len(member_queries), DIM)))
    return vectors, np.concatenate([member_queries, strangers]).astype(np.float32)


def single_query_ms(index: Any, queries: np.ndarray) -> tuple[float, np.ndarray]:
    sims = np.empty(len(queries), dtype=np.float32)
    start = time.perf_counter()
    for i in range(len(queries)):
        d, _ = index.search(queries[i : i + 1], 1)
        sims[i] = d[0, 0]
    return (time.perf_counter() - start) * 1000 / len(queries), sims


def _breadths(index: Any, kind: str) -> list[tuple[str, int]]:
    if kind == "hnsw":
        return [("efSearch", v) for v in (64, 128, 256)]
    if kind == "ivf":
        return [("nprobe", v) for v in (32, 64, 128)]
    return [("exact", 0)]


def _set_breadth(index: Any, name: str, value: int) -> None:
    if name == "efSearch":
        index.hnsw.efSearch = value
    elif name == "nprobe":
        index.nprobe = value


def run(sizes: tuple[int, ...] = (100_000, 1_000_000), queries: int = 400) -> list[dict[str, Any]]:
    faiss.omp_set_num_threads(2)
    results = []
    for n in sizes:
        vectors, query_vectors = synthetic(n, queries)
        members = np.zeros(len(query_vectors), dtype=bool)
        members[: queries // 2] = True
        exact_ms = 0.0
        truth = np.empty(0)
        for kind in ("flat", "hnsw", "ivf"):
            start = time.perf_counter()
            index = make_faiss_index(vectors, kind)  # type: ignore[arg-type]
            build_s = time.perf_counter() - start
            for name, value in _breadths(index, kind):
                _set_breadth(index, name, value)
                latency, sims = single_query_ms(index, query_vectors)
                if kind == "flat":
                    exact_ms, truth = latency, sims
                true_matches = truth >= THRESHOLD
                found = (sims >= THRESHOLD) & true_matches
                row = {
                    "bench": "index_scale",
                    "vectors": n,
                    "dim": DIM,
                    "index_type": kind,
                    name: value,
                    "build_s": round(build_s, 1),
                    "query_ms": round(latency, 3),
                    "speedup_vs_flat": round(exact_ms / latency, 1),
                    "match_recall": round(float(found.sum() / max(true_matches.sum(), 1)), 4),
                    # Queries near an enrolled identity: the matches that protect someone.
                    "member_match_recall": round(
                        float(found[members].sum() / max(true_matches[members].sum(), 1)), 4
                    ),
                    "true_matches": int(true_matches.sum()),
                    "chance_matches_of_strangers": int(true_matches[~members].sum()),
                    "queries": len(query_vectors),
                    "threshold": THRESHOLD,
                    "threads": 2,
                }
                emit(row)
                results.append(row)
            del index
    return results
