"""The 64 px generated workload's filter throughput, this checkout against another one,
side by side: `make bench`'s fast-path line (192 DCGAN faces, the generated fast path,
batches of 64, a 200-identity demo index at 0.56; `filter_faces_per_s` until 2026-12-06,
when the served path became the full pyramid, now `fast_path_opt_in_faces_per_s`) run
alternately by each checkout's own code and interpreter, in child processes.

    .venv/bin/python -m bench.ab --baseline /work/main [--rounds 2] [--repeats 3]

Rounds alternate baseline, this checkout, baseline, ... so that a change of machine load
hits both; each child reports its best of `repeats` timed runs after a warm-up, in wall
time and in CPU time of the process (`time.process_time`). On a machine shared with other
jobs the wall-time rate swings with their load (±40 % between rounds on 2 cores at load
10); the CPU-time rate, with one torch thread (`--threads 1`, the default: no time spent
waiting for a second thread), measures the work itself and is the figure to compare
there. Prints one line per child and a summary: the median of each side's bests and
their ratios, with the load average before and after. Each side's demo index is built
once and kept under --cache. Only APIs both sides have are used.

With `--equivalence N` the same run first shows that both sides give the same faces and
verdicts (`bench.equivalence` against the baseline: the test photos and N generated faces,
full and fast path), so one report holds the equality and the speed ratio side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys, time
from dataclasses import replace
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[2]))
from bench.common import MODELS, generated_faces
from filter.faces import FaceAligner
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.index import FaissIdentityIndex
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface
try:  # the baseline may predate issue 22: filter.runtime, and a filter taking a float
    from filter.assembly import build_embedding_pipeline
    from filter.thresholds import pinned_thresholds
except ImportError:
    from filter.runtime import build_embedding_pipeline
    def pinned_thresholds(index, identity):
        return identity

pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
cached = Path(sys.argv[3])
if cached.exists():
    index = FaissIdentityIndex.load(cached)
else:
    index = build_demo_index(load_dcgan_digiface(MODELS), pipeline, identities=200, seed=1)
    index.save(cached)
images = generated_faces(192, seed=100)
detector = pipeline.aligner.detector
fast = FaceEmbeddingPipeline(
    FaceAligner(detector.with_settings(replace(detector.settings, min_face_fraction=0.5)),
                pipeline.embedder.crop_size),
    pipeline.embedder,
)
filt = IdentityFilter(fast, index, pinned_thresholds(index, 0.56))

def run():
    return sum(v.faces for s in range(0, len(images), 64) for v in filt.check(images[s:s + 64]))

run()
best = best_cpu = 0.0
for _ in range(int(sys.argv[1])):
    start, cpu = time.perf_counter(), time.process_time()
    faces = run()
    best = max(best, faces / (time.perf_counter() - start))
    best_cpu = max(best_cpu, faces / (time.process_time() - cpu))
print(json.dumps({"faces": faces, "filter_faces_per_s": round(best, 2),
                  "filter_faces_per_cpu_s": round(best_cpu, 2)}))
"""


def _child(tree: Path, repeats: int, threads: int, index: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "FACEGATE_MODELS_DIR": str(REPO / "models"),
    }
    out = subprocess.run(
        [
            str(tree / ".venv" / "bin" / "python"),
            "-c",
            WORKER,
            str(repeats),
            str(threads),
            str(index),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "facegate-ab")
    parser.add_argument(
        "--equivalence",
        type=int,
        default=None,
        metavar="N",
        help="first compare faces and verdicts with the baseline's on N generated faces",
    )
    args = parser.parse_args(argv)
    equal: dict[str, Any] | None = None
    if args.equivalence is not None:
        from bench import equivalence

        equal = equivalence.against(args.baseline, args.equivalence)
        print(json.dumps(equal))
    trees = {"baseline": args.baseline.resolve(), "this": REPO}
    args.cache.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    wall: dict[str, list[float]] = {"baseline": [], "this": []}
    cpu: dict[str, list[float]] = {"baseline": [], "this": []}
    for round_ in range(args.rounds):
        for side, tree in trees.items():
            index = args.cache / f"{side}-{_head(tree)}-index"
            row = _child(tree, args.repeats, args.threads, index)
            wall[side].append(row["filter_faces_per_s"])
            cpu[side].append(row["filter_faces_per_cpu_s"])
            print(json.dumps({"bench": "ab_child", "round": round_, "side": side, **row}))
    w = {side: statistics.median(values) for side, values in wall.items()}
    c = {side: statistics.median(values) for side, values in cpu.items()}
    print(
        json.dumps(
            {
                "bench": "ab_filter_throughput",
                "baseline": str(trees["baseline"]),
                "torch_threads": args.threads,
                "baseline_faces_per_s": w["baseline"],
                "this_faces_per_s": w["this"],
                "wall_ratio_this_to_baseline": round(w["this"] / w["baseline"], 3),
                "baseline_faces_per_cpu_s": c["baseline"],
                "this_faces_per_cpu_s": c["this"],
                "cpu_ratio_this_to_baseline": round(c["this"] / c["baseline"], 3),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                **({} if equal is None else {"same_faces_and_verdicts": equal["same"]}),
            }
        )
    )
    return 0 if equal is None or equal["same"] else 1


def _head(tree: Path) -> str:
    """The checkout's commit: each one's demo index is cached apart."""
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return head or "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
