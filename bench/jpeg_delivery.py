"""Why a JPEG is checked as decoded: how far the service's JPEG encoding moves a generated
face's best similarity to an enrolled set, and how many verdicts it would turn.

    .venv/bin/python -m bench.jpeg_delivery [--enrolled 400] [--probes 1000]

Enrolled: generated faces of one seed (SFace, the default embedder); probes: generated
faces of another, checked as generated and as decoded from the JPEG the service would
send (service.encoding.deliver) at several qualities. `pass_to_reject` counts probes that
pass as generated but would be rejected as delivered: what a filter checking the
generator's pixels would have released. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import MODELS, device_name, emit, generated_faces
from filter.assembly import build_embedding_pipeline
from service.encoding import deliver

QUALITIES = (90, 50, 20, 5, 1)
THRESHOLDS = (0.40, 0.56)  # the default identity threshold, and a calibrated demo one


def _best_similarities(
    pipeline: object, images: list[np.ndarray], enrolled: np.ndarray
) -> np.ndarray:
    """Each image's best face similarity to `enrolled` (NaN: no face found)."""
    best = []
    for start in range(0, len(images), 64):
        for faces in pipeline.embed_images(images[start : start + 64]):  # type: ignore[attr-defined]
            scores = faces.embeddings @ enrolled.T
            best.append(float(scores.max()) if scores.size else np.nan)
    return np.array(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrolled", type=int, default=400)
    parser.add_argument("--probes", type=int, default=1000)
    args = parser.parse_args()
    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    enrolled_faces = pipeline.embed_images(generated_faces(args.enrolled, seed=1))
    enrolled = np.concatenate([f.embeddings for f in enrolled_faces if len(f.embeddings)])
    probes = generated_faces(args.probes, seed=2)
    raw = _best_similarities(pipeline, probes, enrolled)
    for quality in QUALITIES:
        delivered = [deliver(image, quality)[0] for image in probes]
        jpeg = _best_similarities(pipeline, delivered, enrolled)
        both = np.isfinite(raw) & np.isfinite(jpeg)
        delta = jpeg[both] - raw[both]
        row: dict[str, object] = {
            "bench": "jpeg_delivery",
            "device": device_name(),
            "quality": quality,
            "probes": args.probes,
            "faces_as_generated": int(np.isfinite(raw).sum()),
            "faces_lost": int((np.isfinite(raw) & ~np.isfinite(jpeg)).sum()),
            "similarity_shift_max": round(float(delta.max()), 3),
            "similarity_shift_p99": round(float(np.percentile(delta, 99)), 3),
        }
        for threshold in THRESHOLDS:
            row[f"pass_to_reject_at_{threshold}"] = int(
                ((raw < threshold) & (jpeg >= threshold) & both).sum()
            )
            row[f"reject_to_pass_at_{threshold}"] = int(
                ((raw >= threshold) & (jpeg < threshold) & both).sum()
            )
        emit(row)


if __name__ == "__main__":
    main()
