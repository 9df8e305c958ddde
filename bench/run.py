"""`make bench`: every benchmark, JSON lines, ratios measured side by side in one run.

    .venv/bin/python -m bench.run [filter] [service] [index] [signing] [resolution]
                                                                       # default: all

The last line sums up: embedder_fraction (filter; one batch at a time, two sharing the
stages, the server's CPU lanes, and the ceiling the stages' one-core costs set,
bench/cpu_ceiling.py), the
naive speedup for reference only, service_speedup and service_p99_ratio,
fast_path_agreement and the enrolled outputs below the threshold as served and through the
opt-in fast path, the largest index's result, and images/s at 512, 1,024 and 2,048 px
with their cost against the overview-only detector (resolution).

`BENCH_INDEX_SIZES` sizes the index runs (default 100000, so that `make bench` takes
under 10 minutes on 2 cores); the 1M-vector run is opt-in:
`BENCH_INDEX_SIZES=100000,1000000 make bench` (about 10 more minutes: HNSW build).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from bench.common import device_name, emit


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    wanted = set(argv) or {"filter", "service", "index", "signing", "resolution"}
    summary: dict[str, Any] = {"bench": "summary", "device": device_name()}
    if "index" in wanted:
        from bench import index_bench

        sizes = tuple(int(n) for n in os.environ.get("BENCH_INDEX_SIZES", "100000").split(","))
        rows = index_bench.run(sizes)
        best = [
            r
            for r in rows
            if r["vectors"] == max(x["vectors"] for x in rows)
            and r["index_type"] != "flat"
            and r["match_recall"] >= 0.99
        ]
        if best:
            fastest = min(best, key=lambda r: r["query_ms"])
            summary.update(
                {
                    "index_vectors": fastest["vectors"],
                    "index_type": fastest["index_type"],
                    "index_query_ms": fastest["query_ms"],
                    "index_match_recall": fastest["match_recall"],
                }
            )
    if "signing" in wanted:  # a few seconds
        from bench import signing_bench

        summary.update(signing_bench.run())
    if "resolution" in wanted:  # about two minutes on 2 cores
        from bench import resolution_bench

        summary.update(resolution_bench.run())
    if "service" in wanted:
        from bench import service_bench

        summary.update(service_bench.run())
    if "filter" in wanted:
        from bench import filter_bench

        result = filter_bench.run()
        summary.update(
            {
                k: result[k]
                for k in (
                    "filter_faces_per_s",
                    "filter_faces_per_s_in_flight_2",
                    "filter_faces_per_s_lanes",
                    "filter_faces_per_s_mtcnn",
                    "naive_faces_per_s",
                    "embedder_alone_faces_per_s",
                    "fast_path_agreement",
                    "served_self_match_below_threshold",
                    "fast_path_self_match_below_threshold",
                    "naive_speedup_reference",
                    "embedder_fraction",
                    "embedder_fraction_in_flight_2",
                    "embedder_fraction_lanes",
                    "embedder_fraction_ceiling",
                    "detect_ms_per_face_for_0_80",
                    "replica_throughput_ratio",
                )
            }
        )
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
