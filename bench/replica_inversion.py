"""Can a stored replica feature be turned back into a recognisable face? An attacker with
an index folder holds, for each training image, its feature rows and the projection
(replica_projection.npy). This script plays that attacker as well as it can and measures
the result with the face embedder.

    .venv/bin/python -m bench.replica_inversion [--images 200]

Two attacks:
- analytic: every step from an image's 32x32 working frame to its stored row is linear
  (blur, resampling, channel means, projection) except the final scaling to unit length.
  The attacker solves a regularised least-squares problem per training image for the
  frame that best explains its stored row, the lost scale set to the typical norm of a
  whitened training row, the lost channel means taken from fresh generator samples (the
  generator is public);
- learned: a linear decoder from stored rows to frames, fitted by ridge regression on
  --attacker-samples pairs the attacker makes with the public generator and the index's
  own projection: the best linear estimate given the generator's prior.
Regularisation weights are chosen with the originals in hand, which no real attacker has:
the figures are the attacker's best case. The same attacks run on the format-2 feature
(bench/replica_v1.py: one 16x16 row of 64 numbers), and, with --components, on this
feature at other widths (what a wider stored row would give back).

What is measured, for each reconstruction against its original training image: whether a
face is detected, the SFace cosine similarity, the share at or above the identity
thresholds (0.40 default; the `make eval` calibrated one), and whether the nearest of all
the training images' embeddings is its own (rank-1 identification among --images). As an
upper bound on what the feature could ever give back, the same figures for the blurred
working frame itself (everything the feature sees, with nothing lost to the projection).
One JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from bench.common import MODELS
from bench.replica_v1 import V1Featurizer
from bench.replica_v1 import low_res as v1_low_res
from filter.assembly import build_embedding_pipeline
from filter.replica import FRAME_SIDE, ReplicaFeaturizer, frames, low_res
from service.generators import latents_for, load_dcgan_digiface

CALIBRATED_IDENTITY = 0.571  # README "The threshold": make eval's calibrated threshold


def _linear_map(view_function: Callable[[np.ndarray], list[np.ndarray]], side: int) -> np.ndarray:
    """The matrix of frame -> concatenated low-res rows of every view (float frames)."""
    size = side * side * 3
    columns = []
    for j in range(size):
        basis = np.zeros(size, dtype=np.float32)
        basis[j] = 1.0
        frame = basis.reshape(side, side, 3)
        columns.append(np.concatenate([row for row in view_function(frame)]))
    return np.stack(columns, axis=1)  # (views * 768, side * side * 3)


def _smoothness(side: int) -> np.ndarray:
    """Finite differences between neighbouring pixels of each channel."""
    rows = []
    index = np.arange(side * side * 3).reshape(side, side, 3)
    for axis in (0, 1):
        a = np.take(index, np.arange(side - 1), axis=axis).reshape(-1)
        b = np.take(index, np.arange(1, side), axis=axis).reshape(-1)
        d = np.zeros((len(a), side * side * 3), dtype=np.float32)
        d[np.arange(len(a)), a] = 1.0
        d[np.arange(len(a)), b] = -1.0
        rows.append(d)
    return np.concatenate(rows)


def invert(
    stored: np.ndarray,  # (images, rows per image, k) unit rows
    mean: np.ndarray,
    basis: np.ndarray,
    linear: np.ndarray,  # (rows per image * 768, frame size)
    side: int,
    typical_norm: float,
    prior: np.ndarray,  # (side, side, 3): the generator's average frame
    smoothness: float,
) -> np.ndarray:
    """(images, side, side, 3) float frames: the least-squares pre-images, pulled towards
    the prior (the average of the public generator's outputs) where the rows say nothing."""
    views_per_image = stored.shape[1]
    dim = mean.shape[0]
    # frame -> every view's projected row (before the mean), stacked
    system = np.concatenate(
        [basis @ linear[v * dim : (v + 1) * dim] for v in range(views_per_image)]
    )
    offset = np.concatenate([basis @ mean] * views_per_image)
    difference = _smoothness(side)
    regulariser = smoothness * difference.T @ difference + 1e-3 * np.eye(
        system.shape[1], dtype=np.float32
    )
    normal = system.T @ system + regulariser
    targets = typical_norm * stored.reshape(len(stored), -1) + offset
    anchor = regulariser @ prior.reshape(-1)
    solved = np.linalg.solve(normal, system.T @ targets.T + anchor[:, None]).T
    out = solved.reshape(len(stored), side, side, 3)
    # The channel means are lost (each view removes them): the prior's.
    return out - out.mean(axis=(1, 2), keepdims=True) + prior.mean(axis=(0, 1))


def learned_decoder(
    features: np.ndarray, targets: np.ndarray, ridge: float
) -> Callable[[np.ndarray], np.ndarray]:
    """A linear map from stored rows to frames, fitted by ridge regression on pairs the
    attacker makes from the public generator: the best linear estimate given that prior."""
    x_mean, y_mean = features.mean(axis=0), targets.mean(axis=0)
    x, y = features - x_mean, targets - y_mean
    weights = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)
    return lambda rows: (rows - x_mean) @ weights + y_mean


def _to_image(frame: np.ndarray) -> np.ndarray:
    return (
        cv2.resize(
            np.clip(frame, 0, 255).astype(np.float32), (64, 64), interpolation=cv2.INTER_CUBIC
        )
        .clip(0, 255)
        .astype(np.uint8)
    )


def measure(
    name: str, reconstructions: list[np.ndarray], originals: np.ndarray, pipeline: Any
) -> dict[str, Any]:
    def embed(images: list[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for start in range(0, len(images), 64):
            for faces in pipeline.embed_images(images[start : start + 64]):
                out.append(faces.embeddings[0] if len(faces.faces) else None)
        return out

    original = embed(list(originals))
    rebuilt = embed(reconstructions)
    gallery = np.stack([e if e is not None else np.zeros(pipeline.embedder.dim) for e in original])
    sims, rank1, detected = [], 0, 0
    for i, (a, b) in enumerate(zip(original, rebuilt, strict=True)):
        if a is None:
            continue
        if b is None:
            sims.append(np.nan)
            continue
        detected += 1
        sims.append(float(a @ b))
        rank1 += int(np.argmax(gallery @ b) == i)
    scored = np.array(sims)
    faced = np.isfinite(scored)
    return {
        "bench": "replica_inversion",
        "case": name,
        "originals_with_a_face": len(scored),
        "reconstructions_with_a_face": detected,
        "sface_similarity_median": float(np.median(scored[faced])) if faced.any() else None,
        "sface_similarity_p95": float(np.quantile(scored[faced], 0.95)) if faced.any() else None,
        "at_or_above_0.40": float((scored[faced] >= 0.40).sum() / max(len(scored), 1)),
        f"at_or_above_{CALIBRATED_IDENTITY}": float(
            (scored[faced] >= CALIBRATED_IDENTITY).sum() / max(len(scored), 1)
        ),
        "rank1_identified": rank1 / max(len(scored), 1),
        "gallery": len(originals),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--attacker-samples", type=int, default=3000)
    parser.add_argument(
        "--components",
        type=int,
        nargs="*",
        default=[],
        help="also attack this feature fitted with these widths (the stored row's length)",
    )
    parser.add_argument("--save", help="write a PNG: originals, then each attack's best")
    args = parser.parse_args(argv)
    generator = load_dcgan_digiface(MODELS)

    def sample(seed: int, count: int) -> np.ndarray:
        latents = [latents_for(seed, s, 0, generator.latent_dim) for s in range(count)]
        return np.concatenate(
            [generator.generate(np.stack(latents[i : i + 256])) for i in range(0, count, 256)]
        )

    training = sample(2399, args.images)
    public = sample(2398, args.attacker_samples)  # the attacker's own generator samples
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")

    # What the index stores (filter/replica.py), exactly as an index build computes it.
    framed = frames(list(training))
    featurizer = ReplicaFeaturizer.fit(framed)
    stored = featurizer.enrolled(framed)[:, None, :]  # one row per training image
    public_frames = frames(list(public))
    prior = public_frames.astype(np.float32).mean(axis=0)
    whitened = (low_res(framed) - featurizer.mean) @ featurizer.basis.T
    typical = float(np.median(np.linalg.norm(whitened, axis=1)))
    linear = _linear_map(lambda f: [low_res(f[None])[0]], FRAME_SIDE)
    # Format 2's feature, attacked the same ways (one view of a 16x16 image, 64 numbers).
    v1 = V1Featurizer(list(training))
    v1_stored = v1.features(list(training))[:, None, :]
    v1_prior = cv2.resize(prior, (16, 16), interpolation=cv2.INTER_AREA)
    v1_typical = float(
        np.median(np.linalg.norm((v1_low_res(list(training)) - v1.mean) @ v1.basis.T, axis=1))
    )
    v1_linear = _linear_map(lambda f: [v1_low_res([f])[0]], 16)

    cases: dict[str, list[list[np.ndarray]]] = {}

    def report(case: str, setting: str, rebuilt: list[np.ndarray]) -> None:
        result = measure(f"{case}: {setting}", rebuilt, training, pipeline)
        print(json.dumps(result), flush=True)
        cases.setdefault(case, []).append(rebuilt)
        scores.setdefault(case, []).append(result["sface_similarity_median"] or -1.0)

    scores: dict[str, list[float]] = {}
    current = f"1 row x {featurizer.dim} (format 3)"
    old = "1 row x 64 (format 2)"
    for smoothness in (0.1, 1.0):
        report(
            current,
            f"analytic pre-image, smoothness {smoothness:g}",
            [
                _to_image(f)
                for f in invert(
                    stored,
                    featurizer.mean,
                    featurizer.basis,
                    linear,
                    FRAME_SIDE,
                    typical,
                    prior,
                    smoothness,
                )
            ],
        )
        report(
            old,
            f"analytic pre-image, smoothness {smoothness:g}",
            [
                _to_image(f)
                for f in invert(
                    v1_stored, v1.mean, v1.basis, v1_linear, 16, v1_typical, v1_prior, smoothness
                )
            ],
        )
    public_rows = featurizer.enrolled(public_frames)
    public_v1 = v1.features(list(public))
    targets = public_frames.reshape(len(public), -1).astype(np.float32)
    for ridge in (1e-3, 1e-2, 1e-1):
        decode = learned_decoder(public_rows, targets, ridge)
        report(
            current,
            f"linear decoder learned on {len(public)} generator samples, ridge {ridge:g}",
            [
                _to_image(f.reshape(FRAME_SIDE, FRAME_SIDE, 3))
                for f in decode(stored.reshape(len(stored), -1))
            ],
        )
        decode_v1 = learned_decoder(public_v1, targets, ridge)
        report(
            old,
            f"linear decoder learned on {len(public)} generator samples, ridge {ridge:g}",
            [_to_image(f.reshape(FRAME_SIDE, FRAME_SIDE, 3)) for f in decode_v1(v1_stored[:, 0])],
        )
    for width in args.components:
        wider = ReplicaFeaturizer.fit(framed, components=width)
        wide_stored, wide_public = wider.enrolled(framed), wider.enrolled(public_frames)
        for ridge in (1e-3, 1e-2, 1e-1):
            decode = learned_decoder(wide_public, targets, ridge)
            report(
                f"1 row x {wider.dim} (this feature, wider)",
                f"linear decoder learned on {len(public)} generator samples, ridge {ridge:g}",
                [_to_image(f.reshape(FRAME_SIDE, FRAME_SIDE, 3)) for f in decode(wide_stored)],
            )
    blurred = [_to_image(cv2.GaussianBlur(f.astype(np.float32), (0, 0), 1.0)) for f in framed]
    report("upper bound", "the blurred 32x32 working frame itself (all the feature sees)", blurred)
    thumbnails = [
        _to_image(cv2.resize(t, (16, 16), interpolation=cv2.INTER_AREA)) for t in training
    ]
    report("upper bound", "a 16x16 thumbnail (all format 2's feature sees)", thumbnails)
    if args.save:
        rows = [np.concatenate(list(training[:12]), axis=1)]
        for case, attempts in cases.items():
            best = attempts[int(np.argmax(scores[case]))]
            rows.append(np.concatenate(best[:12], axis=1))
        cv2.imwrite(args.save, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
