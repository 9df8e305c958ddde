"""How two runs of the filter on the same images agree: another device against the CPU,
or an image checked in a batch against the same image checked alone.

A verdict flip is an image passed by one run and rejected by the other. Floating-point
differences between devices move similarities by a little, so a flip is *explained* when
the deciding similarity sits within `tolerance` of its threshold in either run (the
identity similarity of the image's best face, or its replica similarity); a flip far from
every threshold means the runs measured different things (a face found by one run only,
a different embedding), and is never acceptable. Faces are paired by box overlap, and the
embeddings of each pair compared by cosine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from filter.decide import DecisionThresholds, ImageEvidence, ImageVerdict, NoFacePolicy, decide
from filter.identity_filter import IdentityFilter, ImageFaces

# Faces of two runs are the same face when their boxes overlap at least this much.
SAME_FACE_IOU = 0.5


@dataclass(frozen=True)
class FilterRun:
    """What one run of the filter measured on each image (its evidence, so that verdicts
    can be taken at any thresholds), and the faces behind it."""

    evidence: list[ImageEvidence]
    faces: list[ImageFaces]

    def verdicts(
        self, thresholds: DecisionThresholds, no_face: NoFacePolicy = NoFacePolicy.REJECT
    ) -> list[ImageVerdict]:
        return [decide(e, thresholds, no_face) for e in self.evidence]

    def __getitem__(self, items: slice) -> FilterRun:
        return FilterRun(self.evidence[items], self.faces[items])


@dataclass(frozen=True)
class Agreement:
    images: int
    verdict_flips: int  # passed by one run, rejected by the other
    flips_near_threshold: int  # of those, explained by a similarity within the tolerance
    reason_changes: int  # rejected by both, for another reason
    face_count_differs: int  # images whose runs found different numbers of faces
    faces_paired: int
    faces_unpaired: int  # in either run, without a counterpart
    cosines: np.ndarray  # of each pair's embeddings
    similarity_max_diff: float  # largest change of an image's best identity similarity
    tolerance: float

    @property
    def flips_far_from_threshold(self) -> int:
        return self.verdict_flips - self.flips_near_threshold

    def summary(self) -> dict[str, object]:
        cosines = self.cosines if len(self.cosines) else np.ones(1)
        return {
            "images": self.images,
            "verdict_flips": self.verdict_flips,
            "flips_near_threshold": self.flips_near_threshold,
            "flips_far_from_threshold": self.flips_far_from_threshold,
            "tolerance": self.tolerance,
            "reason_changes": self.reason_changes,
            "face_count_differs": self.face_count_differs,
            "faces_paired": self.faces_paired,
            "faces_unpaired": self.faces_unpaired,
            "cosine_min": round(float(cosines.min()), 7),
            "cosine_p01": round(float(np.percentile(cosines, 1)), 7),
            "cosine_p50": round(float(np.percentile(cosines, 50)), 7),
            "similarity_max_diff": round(self.similarity_max_diff, 7),
        }


def run_filter(checker: IdentityFilter, images: Sequence[np.ndarray], batch: int) -> FilterRun:
    """The filter's evidence and faces for every image, checked `batch` images at a time."""
    evidence: list[ImageEvidence] = []
    faces: list[ImageFaces] = []
    for start in range(0, len(images), batch):
        part_evidence, part_faces = checker.inspect(images[start : start + batch])
        evidence.extend(part_evidence)
        faces.extend(part_faces)
    return FilterRun(evidence, faces)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def paired_cosines(a: ImageFaces, b: ImageFaces) -> tuple[list[float], int]:
    """Cosines of the embeddings of faces paired greedily by box overlap, and how many
    faces (of either run) found no counterpart."""
    pairs = sorted(
        (
            (box_iou(fa.box, fb.box), i, j)
            for i, fa in enumerate(a.faces)
            for j, fb in enumerate(b.faces)
        ),
        reverse=True,
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    cosines: list[float] = []
    for iou, i, j in pairs:
        if iou < SAME_FACE_IOU or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        cosines.append(float(np.dot(a.embeddings[i], b.embeddings[j])))
    return cosines, len(a.faces) + len(b.faces) - 2 * len(cosines)


def _near(value: float | None, threshold: float | None, tolerance: float) -> bool:
    if value is None or threshold is None or not math.isfinite(value):
        return False
    return abs(value - threshold) <= tolerance


def compare_runs(
    reference: FilterRun,
    other: FilterRun,
    thresholds: DecisionThresholds,
    tolerance: float,
    no_face: NoFacePolicy = NoFacePolicy.REJECT,
) -> Agreement:
    """The two runs' verdicts at these thresholds, and their faces, compared."""
    if len(reference.evidence) != len(other.evidence):
        raise ValueError("the runs checked different numbers of images")
    flips = near = reasons = counts = paired = unpaired = 0
    cosines: list[float] = []
    similarity_diff = 0.0
    for ref_v, oth_v, ref_f, oth_f in zip(
        reference.verdicts(thresholds, no_face),
        other.verdicts(thresholds, no_face),
        reference.faces,
        other.faces,
        strict=True,
    ):
        if ref_v.passed != oth_v.passed:
            flips += 1
            if any(
                _near(v.max_similarity, thresholds.identity, tolerance)
                or _near(v.replica_similarity, thresholds.replica, tolerance)
                for v in (ref_v, oth_v)
            ):
                near += 1
        elif not ref_v.passed and ref_v.reason != oth_v.reason:
            reasons += 1
        if len(ref_f.faces) != len(oth_f.faces):
            counts += 1
        pair_cosines, lost = paired_cosines(ref_f, oth_f)
        cosines.extend(pair_cosines)
        paired += len(pair_cosines)
        unpaired += lost
        if ref_v.max_similarity is not None and oth_v.max_similarity is not None:
            diff = abs(ref_v.max_similarity - oth_v.max_similarity)
            if math.isfinite(diff):
                similarity_diff = max(similarity_diff, diff)
    return Agreement(
        images=len(reference.evidence),
        verdict_flips=flips,
        flips_near_threshold=near,
        reason_changes=reasons,
        face_count_differs=counts,
        faces_paired=paired,
        faces_unpaired=unpaired,
        cosines=np.asarray(cosines, dtype=np.float64),
        similarity_max_diff=similarity_diff,
        tolerance=tolerance,
    )
