"""Issue 23's "What was measured" table, rebuilt on any facegate code tree: which copies of
training images the filter rejects, and how, with the thresholds `calibrate --save` picks.

    .venv/bin/python -m bench.replica_compare [--code DIR ...] [--per-probe 200]
        [--calibration 300] [--sigma-draws 5]

The setup is the issue's (`make eval` style): 200 generator outputs enrolled as the
training set, both thresholds calibrated jointly at a 5 % false-reject target on 300
held-out generator samples (the function `calibrate --save` runs), then every probe
checked at those thresholds with the default no-face policy (reject). The probe sets are
built once, by this checkout (filter.augment), and scored by each code tree given with
--code in its own process (default: this checkout), so main's code and a branch's are
measured on the very same images. One JSON line per (code, set); a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GALLERY_SEED, CALIBRATION_SEED, TEST_SEED, NOISE_SEED, TRANSFORM_SEED = (
    23_100,
    23_101,
    23_102,
    23_103,
    23_200,
)


def build_sets(
    per_probe: int, calibration: int, test: int, sigma_draws: int
) -> dict[str, np.ndarray]:
    from bench.common import MODELS
    from filter.augment import PROBE_TRANSFORMS, crop, mirror, recompress, shift, transformed
    from service.generators import latents_for, load_dcgan_digiface

    generator = load_dcgan_digiface(MODELS)

    def latents(seed: int, count: int) -> np.ndarray:
        return np.stack([latents_for(seed, s, 0, generator.latent_dim) for s in range(count)])

    def generate(z: np.ndarray) -> np.ndarray:
        return np.concatenate([generator.generate(z[i : i + 64]) for i in range(0, len(z), 64)])

    gallery_latents = latents(GALLERY_SEED, 200)
    gallery = generate(gallery_latents)
    rng = np.random.default_rng(NOISE_SEED)
    base = gallery_latents[:per_probe]
    sets: dict[str, np.ndarray] = {"gallery": gallery}
    sets["near_copies_sigma_0.3"] = generate(
        (base + 0.3 * rng.standard_normal(base.shape)).astype(np.float32)
    )
    sets["near_copies_sigma_0.2_jpeg_70"] = np.stack(
        [
            recompress(image, "JPEG", 70)
            for image in generate((base + 0.2 * rng.standard_normal(base.shape)).astype(np.float32))
        ]
    )
    for k, transform in enumerate(PROBE_TRANSFORMS):
        sets[transform.name] = np.stack(
            transformed(gallery[:per_probe], transform, TRANSFORM_SEED + k)
        )
    # The corners of the bounds, which random draws rarely reach: an 85 % window in a
    # corner, a 15 % shift along both axes (28 % of the frame reflected border).
    corners = [(i % 2, (i // 2) % 2) for i in range(per_probe)]
    sets["worst_corner_crop_85"] = np.stack(
        [crop(image, 0.85, fx, fy) for image, (fx, fy) in zip(gallery, corners, strict=False)]
    )
    sets["worst_mirrored_corner_crop_85"] = np.stack(
        [mirror(image) for image in sets["worst_corner_crop_85"]]
    )
    sets["worst_diagonal_shift_15"] = np.stack(
        [
            shift(image, 0.15 * (1 - 2 * fx), 0.15 * (1 - 2 * fy))
            for image, (fx, fy) in zip(gallery, corners, strict=False)
        ]
    )
    # More draws at sigma 0.3, so that a difference of a few tenths of a point shows.
    if sigma_draws > 1:
        draws = np.concatenate(
            [base + 0.3 * rng.standard_normal(base.shape) for _ in range(sigma_draws)]
        )
        sets[f"near_copies_sigma_0.3_x{sigma_draws}"] = generate(draws.astype(np.float32))
    sets["calibration"] = generate(latents(CALIBRATION_SEED, calibration))
    sets["fresh_test"] = generate(latents(TEST_SEED, test))
    return sets


def score(code: Path, sets_file: Path, target: float) -> list[dict[str, Any]]:
    """Runs inside the child process: `code`'s filter package, this checkout's models (the
    same pinned files)."""
    sys.path.insert(0, str(code))
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    models = Path(os.environ["FACEGATE_MODELS_DIR"])
    import filter as filter_package
    from filter.assembly import build_embedding_pipeline, detector_manifest, measuring_filter
    from filter.calibrate import calibrate_thresholds
    from filter.decide import DecisionThresholds, NoFacePolicy, Reason, decide
    from filter.gallery import Enrolment

    loaded = np.load(sets_file)
    pipeline = build_embedding_pipeline("sface", models, device="cpu")
    enrolment = Enrolment(pipeline)
    gallery = loaded["gallery"]
    enrolment.add([(f"train-{i:04d}", f"train/{i}", image) for i, image in enumerate(gallery)])
    index = enrolment.build(detector_settings=detector_manifest(pipeline))
    measuring = measuring_filter(pipeline, index)

    def evidence(images: np.ndarray) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(images), 64):
            out.extend(measuring.evidence(list(images[start : start + 64])))
        return out

    calibration = evidence(loaded["calibration"])
    usable = [
        e
        for e in calibration
        if e.searchable and e.error is None and e.face_matches and e.replica is not None
    ]
    chosen = calibrate_thresholds(
        np.array([max(m.similarity for m in e.face_matches) for e in usable]),
        np.array([e.replica.similarity for e in usable]),
        target,
        sum(1 for e in calibration if e.searchable and not e.face_matches),
    )
    thresholds = DecisionThresholds(chosen.threshold, chosen.replica_threshold)
    replica_bytes = index.replicas.count * index.replicas.dim * 4 if index.replicas else 0
    lines: list[dict[str, Any]] = []
    for name in [str(n) for n in loaded.files if n not in ("gallery", "calibration")]:
        verdicts = [decide(e, thresholds, NoFacePolicy.REJECT) for e in evidence(loaded[name])]
        reasons = [v.reason for v in verdicts]
        count = len(verdicts)
        line: dict[str, Any] = {
            "code": str(code),
            "filter_package": str(Path(filter_package.__file__).parent),
            "set": name,
            "images": count,
            "rejected": sum(not v.passed for v in verdicts) / count,
            "identity": reasons.count(Reason.IDENTITY_MATCH),
            "replica": reasons.count(Reason.REPLICA),
            "no_face": reasons.count(Reason.NO_FACE),
            "released": sum(v.passed for v in verdicts),
            "threshold": thresholds.identity,
            "replica_threshold": thresholds.replica,
            "replica_rows_per_training_image": (index.replicas.count if index.replicas else 0)
            / len(gallery),
            "replica_bytes_per_training_image": replica_bytes / len(gallery),
        }
        if name == "fresh_test":
            faced = [v for v in verdicts if v.reason is not Reason.NO_FACE]
            line["false_reject_no_face_apart"] = sum(not v.passed for v in faced) / max(
                len(faced), 1
            )
        lines.append(line)
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", type=Path, help="a facegate source tree")
    parser.add_argument("--per-probe", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument(
        "--sigma-draws", type=int, default=5, help="near-copies at sigma 0.3 per training image"
    )
    parser.add_argument("--target-false-reject", type=float, default=0.05)
    parser.add_argument("--score", type=Path, help=argparse.SUPPRESS)  # child mode: sets file
    args = parser.parse_args(argv)
    if args.score is not None:
        (code,) = args.code
        for line in score(code, args.score, args.target_false_reject):
            print(json.dumps(line), flush=True)
        return 0
    codes = args.code or [REPO]
    with tempfile.TemporaryDirectory(prefix="replica-compare-") as scratch:
        sets_file = Path(scratch) / "sets.npz"
        np.savez(
            sets_file, **build_sets(args.per_probe, args.calibration, args.test, args.sigma_draws)
        )  # type: ignore[arg-type]
        results: dict[str, list[dict[str, Any]]] = {}
        for code in codes:
            from bench.common import MODELS

            env = {**os.environ, "FACEGATE_MODELS_DIR": str(MODELS)}
            env.pop("PYTHONPATH", None)
            child = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--code",
                    str(code.resolve()),
                    "--score",
                    str(sets_file),
                    "--target-false-reject",
                    str(args.target_false_reject),
                ],
                env=env,
                cwd=scratch,
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                sys.stderr.write(child.stderr)
                return child.returncode
            results[str(code)] = [json.loads(line) for line in child.stdout.splitlines()]
            for line in results[str(code)]:
                print(json.dumps(line), flush=True)
    _table(results)
    return 0


def _table(results: dict[str, list[dict[str, Any]]]) -> None:
    codes = list(results)
    print("| probe | " + " | ".join(f"{c}: rejected (how)" for c in codes) + " |", file=sys.stderr)
    print("|---|" + "---|" * len(codes), file=sys.stderr)
    for i, line in enumerate(results[codes[0]]):
        cells = []
        for code in codes:
            row = results[code][i]
            cells.append(
                f"{row['rejected']:.3f} (identity {row['identity']}, replica {row['replica']}, "
                f"no_face {row['no_face']}; {row['released']} released)"
            )
        print(f"| {line['set']} | " + " | ".join(cells) + " |", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
