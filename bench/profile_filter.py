"""Where the filter's time goes: per-stage seconds and a cProfile of one batch.

.venv/bin/python -m bench.profile_filter [--fast-path] [--batch 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from bench.common import MODELS, emit, generated_faces
from filter.assembly import build_embedding_pipeline
from filter.faces import GENERATED_FAST_PATH, FaceAligner, MtcnnDetector
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageTimes
from filter.thresholds import pinned_thresholds
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast-path", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    index = build_demo_index(load_dcgan_digiface(MODELS), pipeline, identities=200, seed=1)
    if args.fast_path:
        detector = pipeline.aligner.detector
        assert isinstance(detector, MtcnnDetector)
        pipeline = FaceEmbeddingPipeline(
            FaceAligner(detector.with_settings(GENERATED_FAST_PATH), pipeline.embedder.crop_size),
            pipeline.embedder,
        )
    filt = IdentityFilter(pipeline, index, pinned_thresholds(index, 0.56))
    images = generated_faces(args.batch * 2, seed=300)
    filt.check(images[: args.batch])  # warm-up
    times = StageTimes()
    profiler = cProfile.Profile()
    profiler.enable()
    filt.check(images[args.batch :], observer=times)
    profiler.disable()
    emit(
        {
            "bench": "filter_profile",
            "fast_path": args.fast_path,
            "images": args.batch,
            "stage_seconds": {k: round(v, 4) for k, v in times.seconds.items()},
        }
    )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
