"""The batched MTCNN (`mtcnn-batched`) against facenet-pytorch's (`mtcnn`): the figures in
README "Detector".

    .venv/bin/python -m bench.detector_validation [--generated 1000]

Sets: the test photos (tests/data/faces, full path: how index build and check detect) and
N faces from the default generator (seed 300), on the full path and on the fast path the
service uses for them. For each set, each detector on its own:
- faces: an old face and a new face are the same face when their boxes overlap with
  IoU >= 0.5 (greedy, best first); figures: the smallest IoU, the share >= 0.95;
- embeddings: SFace cosine between the two alignments of each matched face;
- verdicts: the whole filter, each detector with an index it built itself (photos: an
  index of id01..id03 at 0.40; generated: the demo index, 200 identities of seed 1, at
  0.56, the demo's calibrated threshold), the share of images with the same verdict;
- every face the old detector finds and the new one misses, listed (and the reverse).
JSON lines; the last line sums up. Detection time of both, side by side, is reported too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from bench.common import MODELS, REPO, emit, generated_faces
from filter.assembly import build_embedding_pipeline, detector_manifest
from filter.decide import NoFacePolicy
from filter.faces import DetectedFace, FaceAligner, MtcnnDetector
from filter.gallery import Enrolment
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, ImageFaces, StageTimes
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.thresholds import pinned_thresholds
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface

BATCH = 64
SAME_FACE_IOU = 0.5
TARGET_IOU, TARGET_COSINE, TARGET_AGREEMENT = 0.95, 0.99, 0.999


def iou(a: DetectedFace, b: DetectedFace) -> float:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def match(old: list[DetectedFace], new: list[DetectedFace]) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by IoU, best pairs first."""
    pairs = sorted(
        ((iou(a, b), i, j) for i, a in enumerate(old) for j, b in enumerate(new)), reverse=True
    )
    used_old: set[int] = set()
    used_new: set[int] = set()
    out = []
    for overlap, i, j in pairs:
        if overlap < SAME_FACE_IOU or i in used_old or j in used_new:
            continue
        used_old.add(i)
        used_new.add(j)
        out.append((i, j, overlap))
    return out


def with_detector(pipeline: FaceEmbeddingPipeline, **changes: Any) -> FaceEmbeddingPipeline:
    detector = pipeline.aligner.detector
    assert isinstance(detector, MtcnnDetector)
    scoped = detector.with_settings(replace(detector.settings, **changes))
    return FaceEmbeddingPipeline(FaceAligner(scoped, pipeline.aligner.crop_size), pipeline.embedder)


class Replay(FaceEmbeddingPipeline):
    """A pipeline that hands back faces and embeddings already computed, so the verdicts
    come from the very detections compared (and nothing is detected twice)."""

    def __init__(self, pipeline: FaceEmbeddingPipeline, results: list[ImageFaces]) -> None:
        super().__init__(pipeline.aligner, pipeline.embedder, pipeline.max_embed_batch)
        self.results = results

    def embed_images(self, images: Any, observer: Any = None) -> list[ImageFaces]:
        assert len(images) == len(self.results)
        return self.results


def compare(
    name: str,
    images: list[np.ndarray],
    labels: list[str],
    pipelines: tuple[FaceEmbeddingPipeline, FaceEmbeddingPipeline],
    indexes: tuple[FaissIdentityIndex, FaissIdentityIndex],
    threshold: float,
) -> dict[str, Any]:
    ious: list[float] = []
    cosines: list[float] = []
    missed: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    old_faces = new_faces = agree = 0
    old_rejects = new_rejects = 0
    seconds = {"old": 0.0, "new": 0.0}
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        runs = []
        for key, pipeline in zip(("old", "new"), pipelines, strict=True):
            times = StageTimes()
            runs.append(pipeline.embed_images(chunk, times))
            seconds[key] += times.seconds["detect"]
        for k, (a, b) in enumerate(zip(runs[0], runs[1], strict=True)):
            label = labels[start + k]
            old_faces += len(a.faces)
            new_faces += len(b.faces)
            pairs = match(a.faces, b.faces)
            ious.extend(p[2] for p in pairs)
            cosines.extend(float(a.embeddings[i] @ b.embeddings[j]) for i, j, _ in pairs)
            matched_old = {p[0] for p in pairs}
            matched_new = {p[1] for p in pairs}
            missed += [_face(label, f) for i, f in enumerate(a.faces) if i not in matched_old]
            extra += [_face(label, f) for j, f in enumerate(b.faces) if j not in matched_new]
        verdicts_old, verdicts_new = (
            IdentityFilter(
                Replay(p, run), index, pinned_thresholds(index, threshold), NoFacePolicy.REJECT
            ).check(chunk)
            for p, run, index in zip(pipelines, runs, indexes, strict=True)
        )
        for x, y in zip(verdicts_old, verdicts_new, strict=True):
            agree += (x.passed, x.reason) == (y.passed, y.reason)
            old_rejects += not x.passed
            new_rejects += not y.passed
    result = {
        "bench": "detector_validation",
        "set": name,
        "images": len(images),
        "faces_old": old_faces,
        "faces_new": new_faces,
        "matched": len(ious),
        "iou_min": round(min(ious), 4) if ious else None,
        "iou_share_ge_0.95": round(float(np.mean(np.array(ious) >= TARGET_IOU)), 4),
        "cosine_min": round(min(cosines), 5) if cosines else None,
        "cosine_share_ge_0.99": round(float(np.mean(np.array(cosines) >= TARGET_COSINE)), 4),
        "verdict_agreement": round(agree / len(images), 4),
        "rejects_old": old_rejects,
        "rejects_new": new_rejects,
        "missed_by_new": missed,
        "found_only_by_new": extra,
        "detect_images_per_s_old": round(len(images) / seconds["old"], 1),
        "detect_images_per_s_new": round(len(images) / seconds["new"], 1),
    }
    emit(result)
    return result


def _face(label: str, face: DetectedFace) -> dict[str, Any]:
    return {"image": label, "box": [round(v, 1) for v in face.box], "score": round(face.score, 4)}


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generated", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    new = build_embedding_pipeline("sface", MODELS, device="cpu", detector="mtcnn-batched")
    old = with_detector(new, implementation="mtcnn")
    results = []

    photos_dir = REPO / "tests" / "data" / "faces" / "identities"
    paths = sorted(photos_dir.glob("*/*.jpg"))
    photos = [decode_image(p) for p in paths]
    members = [(p.parent.name, str(p), img) for p, img in zip(paths, photos, strict=True)]

    def gallery(pipeline: FaceEmbeddingPipeline) -> FaissIdentityIndex:
        enrolment = Enrolment(pipeline)
        enrolment.add([m for m in members if m[0] in {"id01", "id02", "id03"}])
        return enrolment.build(detector_settings=detector_manifest(pipeline))

    results.append(
        compare(
            "test photos",
            photos,
            [str(p.relative_to(REPO)) for p in paths],
            (old, new),
            (gallery(old), gallery(new)),
            0.40,
        )
    )

    generator = load_dcgan_digiface(MODELS)
    demo_old = build_demo_index(generator, old, identities=200, seed=1)
    demo_new = build_demo_index(generator, new, identities=200, seed=1)
    faces = generated_faces(args.generated, seed=300)
    labels = [f"generated seed=300 slot={i}" for i in range(len(faces))]
    for path, fraction in (("full path", 0.0), ("fast path", 0.5)):
        results.append(
            compare(
                f"{len(faces)} generated faces, {path}",
                faces,
                labels,
                (
                    with_detector(old, min_face_fraction=fraction),
                    with_detector(new, min_face_fraction=fraction),
                ),
                (demo_old, demo_new),
                0.56,
            )
        )

    ious = [r["iou_min"] for r in results if r["iou_min"] is not None]
    cosines = [r["cosine_min"] for r in results if r["cosine_min"] is not None]
    summary = {
        "bench": "detector_validation_summary",
        "iou_min": min(ious),
        "cosine_min": min(cosines),
        "verdict_agreement_min": min(r["verdict_agreement"] for r in results),
        "missed_by_new": sum(len(r["missed_by_new"]) for r in results),
        "found_only_by_new": sum(len(r["found_only_by_new"]) for r in results),
    }
    summary["targets_met"] = bool(
        summary["iou_min"] >= TARGET_IOU
        and summary["cosine_min"] >= TARGET_COSINE
        and summary["verdict_agreement_min"] >= TARGET_AGREEMENT
        and summary["missed_by_new"] == 0
    )
    emit(summary)
    return 0 if summary["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
