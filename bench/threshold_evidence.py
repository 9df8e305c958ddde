"""Evidence for the default SFace threshold: same-person and different-person cosine
similarities on the test photos, through the same adapter the product uses.

    .venv/bin/python bench/threshold_evidence.py [FACES_DIR]

Prints one JSON object: distribution of each kind of pair, and for candidate
thresholds the share of same-person pairs missed and different-person pairs matched.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

from filter.assembly import build_embedding_pipeline
from filter.images import decode_image


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "tests" / "data" / "faces"
    faces = Path(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("FACEGATE_TEST_FACES", default)
    )
    pipeline = build_embedding_pipeline(
        "sface", Path(os.environ.get("FACEGATE_MODELS_DIR", "models"))
    )
    labels, vectors = [], []
    for path in sorted((faces / "identities").glob("*/*.jpg")):
        result = pipeline.embed_images([decode_image(path)])[0]
        if not result.faces:
            continue
        # The most confident face is the subject; bystanders are not labelled.
        labels.append(path.parent.name)
        vectors.append(result.embeddings[0])
    matrix = np.stack(vectors)
    same, different = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        sim = float(matrix[i] @ matrix[j])
        (same if labels[i] == labels[j] else different).append(sim)
    same_a, diff_a = np.array(same), np.array(different)

    def stats(values: np.ndarray) -> dict[str, float]:
        return {
            "count": int(values.size),
            "min": round(float(values.min()), 4),
            "p5": round(float(np.quantile(values, 0.05)), 4),
            "median": round(float(np.median(values)), 4),
            "p95": round(float(np.quantile(values, 0.95)), 4),
            "max": round(float(values.max()), 4),
        }

    table = {
        f"{t:.2f}": {
            "same_person_missed": round(float((same_a < t).mean()), 4),
            "different_person_matched": round(float((diff_a >= t).mean()), 4),
        }
        for t in (0.30, 0.35, 0.40, 0.45, 0.50)
    }
    print(
        json.dumps(
            {
                "images": len(labels),
                "same_person": stats(same_a),
                "different_person": stats(diff_a),
                "by_threshold": table,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
