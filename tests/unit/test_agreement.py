"""filter.agreement: how two runs of the filter compare (used by the GPU tests and
bench/gpu_bench.py), checked on hand-made runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from filter.agreement import FilterRun, compare_runs, paired_cosines
from filter.decide import DecisionThresholds, ImageEvidence
from filter.faces import DetectedFace
from filter.identity_filter import ImageFaces
from filter.vector_table import Match

THRESHOLDS = DecisionThresholds(identity=0.5, replica=0.9)
LANDMARKS = np.zeros((5, 2), np.float32)
FACE: tuple[tuple[float, float, float, float], list[float]] = ((0.0, 0.0, 10.0, 10.0), [1.0, 0.0])


Box = tuple[float, float, float, float]


def _faces(*boxes_and_vectors: tuple[Box, list[float]]) -> ImageFaces:
    faces = [DetectedFace(box, 0.99, LANDMARKS) for box, _ in boxes_and_vectors]
    vectors = np.array([v for _, v in boxes_and_vectors], np.float32).reshape(-1, 2)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return ImageFaces(faces=faces, embeddings=vectors)


def _evidence(identity: float | None, replica: float = 0.1) -> ImageEvidence:
    faces = [] if identity is None else [Match(identity, "enrolled")]
    return ImageEvidence(face_matches=faces, replica=Match(replica, "training-image"))


def test_faces_pair_by_box_overlap_whatever_their_order() -> None:
    a = _faces(((0, 0, 10, 10), [1, 0]), ((20, 0, 30, 10), [0, 1]))
    b = _faces(((21, 0, 31, 10), [0, 1]), ((0, 1, 10, 11), [1, 0.1]), ((50, 50, 60, 60), [1, 1]))
    cosines, unpaired = paired_cosines(a, b)
    assert sorted(cosines) == pytest.approx([1 / math.sqrt(1.01), 1.0])
    assert unpaired == 1  # the third face of b


def test_flips_near_a_threshold_are_told_apart_from_flips_far_from_it() -> None:
    face, moved = _faces(FACE), _faces((FACE[0], [1.0, 0.05]))
    reference = FilterRun(
        [
            _evidence(0.497),  # passes; 0.503 on the other run rejects: near the threshold
            _evidence(0.2),  # passes; 0.8 on the other run: far from it
            _evidence(0.7),  # identity match; the other run: a replica (another reason)
            _evidence(0.3),
        ],
        [face, face, face, face],
    )
    other = FilterRun(
        [_evidence(0.503), _evidence(0.8), _evidence(0.3, replica=0.95), _evidence(0.3)],
        [face, face, face, moved],
    )
    agreement = compare_runs(reference, other, THRESHOLDS, tolerance=0.01)
    summary = agreement.summary()
    assert (agreement.verdict_flips, agreement.flips_near_threshold) == (2, 1)
    assert agreement.flips_far_from_threshold == 1
    assert agreement.reason_changes == 1
    assert summary["faces_paired"] == 4 and summary["face_count_differs"] == 0
    assert summary["cosine_min"] == pytest.approx(1 / math.sqrt(1.0025), abs=1e-6)
    assert summary["similarity_max_diff"] == pytest.approx(0.6)
    assert compare_runs(reference, other, THRESHOLDS, tolerance=0.001).flips_near_threshold == 0
    # The same runs judged at other thresholds: every image passes in both.
    looser = compare_runs(reference, other, DecisionThresholds(0.9, 0.99), tolerance=0.01)
    assert (looser.verdict_flips, looser.flips_near_threshold) == (0, 0)


def test_a_face_found_by_one_run_only_is_counted() -> None:
    none = ImageFaces(faces=[], embeddings=np.zeros((0, 2), np.float32))
    agreement = compare_runs(
        FilterRun([_evidence(0.1)], [_faces(FACE)]),
        FilterRun([_evidence(None)], [none]),
        THRESHOLDS,
        tolerance=0.01,
    )
    assert agreement.face_count_differs == 1 and agreement.faces_unpaired == 1
    assert agreement.flips_far_from_threshold == 1  # a face passed here, "no face" there
    with pytest.raises(ValueError, match="different numbers"):
        compare_runs(FilterRun([], []), FilterRun([_evidence(0.1)], [none]), THRESHOLDS, 0.01)
