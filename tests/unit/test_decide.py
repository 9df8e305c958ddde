"""Verdicts from evidence: every path that is not a clear pass rejects (no real models)."""

import math

import numpy as np
import pytest

from filter.decide import (
    DecisionThresholds,
    ImageEvidence,
    NoFacePolicy,
    Reason,
    decide,
    verdict_outcome,
)
from filter.vector_table import NO_MATCH, Match

BOTH = DecisionThresholds(identity=0.5, replica=0.8)


def _evidence(*faces: float, replica: float | None = 0.1, **kwargs: object) -> ImageEvidence:
    return ImageEvidence(
        face_matches=[Match(s, "idX") for s in faces],
        replica=None if replica is None else Match(replica, "idR"),
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_similarity_equal_to_the_threshold_matches() -> None:
    verdict = decide(_evidence(0.5), BOTH, NoFacePolicy.REJECT)
    assert not verdict.passed and verdict.reason is Reason.IDENTITY_MATCH
    assert verdict.identity == "idX"
    assert decide(_evidence(0.4999), BOTH, NoFacePolicy.REJECT).passed


def test_replica_equal_to_its_threshold_rejects_as_replica_with_the_training_image() -> None:
    verdict = decide(_evidence(0.2, replica=0.8), BOTH, NoFacePolicy.REJECT)
    assert verdict.reason is Reason.REPLICA and verdict.identity == "idR"
    assert decide(_evidence(0.2, replica=0.7999), BOTH, NoFacePolicy.REJECT).passed


def test_identity_wins_over_replica_when_both_fire() -> None:
    verdict = decide(_evidence(0.9, replica=0.95), BOTH, NoFacePolicy.REJECT)
    assert verdict.reason is Reason.IDENTITY_MATCH


def test_any_face_matching_rejects_the_image() -> None:
    verdict = decide(_evidence(0.1, 0.7, 0.2), BOTH, NoFacePolicy.REJECT)
    assert verdict.reason is Reason.IDENTITY_MATCH and verdict.max_similarity == 0.7


@pytest.mark.parametrize(
    "matches",
    [
        [Match(math.nan, "idX")],
        [Match(0.1, "idX"), NO_MATCH],
        [Match(math.inf, None)],
    ],
)
def test_a_face_without_a_finite_neighbour_is_a_filter_error(matches: list[Match]) -> None:
    evidence = ImageEvidence(face_matches=matches, replica=Match(0.1, "idR"))
    verdict = decide(evidence, BOTH, NoFacePolicy.PASS)
    assert not verdict.passed and verdict.reason is Reason.FILTER_ERROR


def test_a_match_on_another_face_is_still_reported_as_a_match() -> None:
    evidence = ImageEvidence(face_matches=[NO_MATCH, Match(0.9, "idX")], replica=None)
    assert decide(evidence, BOTH, NoFacePolicy.REJECT).reason is Reason.IDENTITY_MATCH


def test_missing_replica_evidence_is_a_filter_error_when_the_signal_is_on() -> None:
    for replica in (None, NO_MATCH):
        evidence = ImageEvidence(face_matches=[Match(0.1, "idX")], replica=replica)
        assert decide(evidence, BOTH, NoFacePolicy.PASS).reason is Reason.FILTER_ERROR
    # Without replica features (replica threshold None) the identity signal decides alone.
    identity_only = DecisionThresholds(identity=0.5)
    assert decide(ImageEvidence([Match(0.1, "idX")]), identity_only, NoFacePolicy.PASS).passed


def test_an_untrusted_embedding_is_a_filter_error_even_with_no_face_policy_pass() -> None:
    evidence = _evidence(replica=0.1, error="an embedding is not finite")
    verdict = decide(evidence, BOTH, NoFacePolicy.PASS)
    assert verdict.reason is Reason.FILTER_ERROR and verdict.detail == "an embedding is not finite"


def test_unsearchable_geometry_rejects_whatever_the_no_face_policy() -> None:
    verdict = decide(_evidence(searchable=False), BOTH, NoFacePolicy.PASS)
    assert not verdict.passed and verdict.reason is Reason.UNSUPPORTED_GEOMETRY


def test_no_face_follows_the_policy_but_a_replica_still_rejects() -> None:
    assert decide(_evidence(), BOTH, NoFacePolicy.REJECT).reason is Reason.NO_FACE
    assert decide(_evidence(), BOTH, NoFacePolicy.PASS).passed
    assert decide(_evidence(replica=0.9), BOTH, NoFacePolicy.PASS).reason is Reason.REPLICA


def test_thresholds_outside_the_cosine_range_are_refused() -> None:
    for bad in (1.5, -2.0, math.nan):
        with pytest.raises(ValueError):
            DecisionThresholds(identity=bad)
        with pytest.raises(ValueError):
            DecisionThresholds(identity=0.5, replica=bad)


def test_each_reason_has_its_metric_outcome() -> None:
    outcomes = {
        reason: verdict_outcome(decide(evidence, BOTH, NoFacePolicy.REJECT))
        for reason, evidence in {
            Reason.IDENTITY_MATCH: _evidence(0.9),
            Reason.REPLICA: _evidence(0.1, replica=0.9),
            Reason.NO_FACE: _evidence(),
            Reason.FILTER_ERROR: _evidence(math.nan),
            Reason.UNSUPPORTED_GEOMETRY: _evidence(searchable=False),
            Reason.TOO_MANY_FACES: _evidence(unsearched_faces=300, face_limit=256),
        }.items()
    }
    assert outcomes == {
        Reason.IDENTITY_MATCH: "rejected_identity",
        Reason.REPLICA: "rejected_replica",
        Reason.NO_FACE: "rejected_no_face",
        Reason.FILTER_ERROR: "rejected_error",
        Reason.UNSUPPORTED_GEOMETRY: "rejected_error",
        Reason.TOO_MANY_FACES: "rejected_too_many_faces",
    }
    assert verdict_outcome(decide(_evidence(0.1), BOTH, NoFacePolicy.REJECT)) == "accepted"


def test_too_many_faces_rejects_whatever_the_policy_and_says_how_many() -> None:
    evidence = _evidence(unsearched_faces=400, face_limit=256)
    for policy in NoFacePolicy:
        verdict = decide(evidence, BOTH, policy)
        assert not verdict.passed and verdict.reason is Reason.TOO_MANY_FACES
        assert verdict.faces == 400 and verdict.detail is not None
        assert "400 faces" in verdict.detail and "256" in verdict.detail


def test_the_rank_of_the_reasons() -> None:
    """identity_match > replica > too_many_faces > unsupported_geometry > filter_error >
    no_face: a match found wins; an image not searched whole comes next."""
    crowd = {"unsearched_faces": 300, "face_limit": 256}
    ranked = [
        (Reason.IDENTITY_MATCH, _evidence(0.9, math.nan, replica=0.95, **crowd)),
        (Reason.REPLICA, _evidence(0.1, math.nan, replica=0.95, **crowd)),
        (Reason.TOO_MANY_FACES, _evidence(0.1, math.nan, error="bad", **crowd)),
        (Reason.UNSUPPORTED_GEOMETRY, _evidence(searchable=False, error="bad")),
        (Reason.FILTER_ERROR, _evidence(math.nan)),
        (Reason.NO_FACE, _evidence()),
    ]
    for expected, evidence in ranked:
        assert decide(evidence, BOTH, NoFacePolicy.REJECT).reason is expected
    # A replica match is named even when a face or the geometry failed.
    assert decide(_evidence(math.nan, replica=0.9), BOTH, NoFacePolicy.REJECT).reason is (
        Reason.REPLICA
    )
    assert decide(_evidence(searchable=False, replica=0.9), BOTH, NoFacePolicy.REJECT).reason is (
        Reason.REPLICA
    )


def test_evaluation_counts_an_image_with_too_many_faces_as_unusable_not_as_no_face() -> None:
    """Rates are taken over scored images: one whose faces were not searched has no
    identity score, and it is not an image without a face either."""
    from filter.evaluate import score_evidence

    scores = score_evidence(
        "set",
        [
            _evidence(unsearched_faces=300, face_limit=256),
            _evidence(),
            _evidence(0.3),
        ],
    )
    assert scores.unusable.tolist() == [True, False, False]
    assert scores.no_face.tolist() == [False, True, False]
    assert scores.scored.tolist() == [False, False, True]


def test_a_missing_replica_score_makes_the_image_unusable_never_a_low_score() -> None:
    """Shared by calibrate and evaluate (issue 22): on an index with replica features, an
    image whose nearest training image was not found (NO_MATCH, or no replica evidence at
    all) is neither a calibration sample, where its NaN would move a threshold or stop the
    calibration, nor an image without a face, nor a pass of the replica signal."""
    from filter.evaluate import score_evidence

    lost = ImageEvidence(face_matches=[Match(0.3, "idX")], replica=NO_MATCH)
    faceless_lost = ImageEvidence(face_matches=[], replica=NO_MATCH)
    unsearched = _evidence(0.3, replica=None)
    good = _evidence(0.3, replica=0.2)
    scores = score_evidence("set", [lost, faceless_lost, unsearched, good], has_replicas=True)
    assert scores.unusable.tolist() == [True, True, True, False]
    assert scores.no_face.tolist() == [False, False, False, False]
    assert scores.scored.tolist() == [False, False, False, True]
    assert bool(np.isfinite(scores.replica[scores.scored]).all())
    # Without replica features, no replica evidence is expected: the image is scored.
    plain = score_evidence("set", [unsearched], has_replicas=False)
    assert plain.scored.tolist() == [True]


def test_a_rejection_without_a_reason_outranks_a_pass() -> None:
    """Ranked as a pass, it lost the tie to the generated view's pass when the server
    took the worst of an image's views, and the JPEG was released (review)."""
    from filter.decide import ImageVerdict, severity, verdict_rank

    passed = ImageVerdict(True, None, 1, 0.1, None)
    rejected = ImageVerdict(False, None, 1, None, None)
    assert min((passed, rejected), key=verdict_rank) is rejected
    assert verdict_rank(rejected) == severity(Reason.FILTER_ERROR)
