"""Shadow thresholds decide on the same evidence as the thresholds in force, are only
counted, and never change a verdict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from filter.decide import DecisionThresholds, ImageEvidence, NoFacePolicy, shadow_change
from filter.index import Match
from filter.shadow import ShadowedFilter, ShadowThresholds


class Evidence:
    """A stand-in filter that returns fixed evidence (what IdentityFilter.evidence measures)."""

    def __init__(self, evidence: list[ImageEvidence], thresholds: DecisionThresholds) -> None:
        self._evidence = evidence
        self.thresholds = thresholds
        self.no_face_policy = NoFacePolicy.REJECT

    def evidence(self, images: Sequence[np.ndarray], observer: Any = None) -> list[ImageEvidence]:
        return self._evidence[: len(images)]


class Counter:
    def __init__(self) -> None:
        self.changes: list[str] = []

    def shadow(self, change: str) -> None:
        self.changes.append(change)


def _image(face: float, replica: float = 0.1) -> ImageEvidence:
    return ImageEvidence(
        face_matches=[Match(face, "id1")], replica=Match(replica, "id1"), searchable=True
    )


def test_verdicts_are_those_in_force_and_differences_are_counted() -> None:
    in_force = DecisionThresholds(identity=0.50, replica=0.90)
    evidence = [_image(0.45), _image(0.55), _image(0.30), _image(0.30, replica=0.92), _image(0.52)]
    inner = Evidence(evidence, in_force)
    counter = Counter()
    shadow = ShadowThresholds(identity=0.40, replica=0.95).applied_to(in_force)
    checked = ShadowedFilter(inner, shadow, counter)  # type: ignore[arg-type]
    verdicts = checked.check([np.zeros((4, 4, 3), np.uint8)] * len(evidence))
    assert [v.passed for v in verdicts] == [True, False, True, False, False]
    assert counter.changes == ["would_reject", "same", "same", "would_pass", "same"]


@pytest.mark.parametrize(
    ("generated", "decoded", "shadow_identity", "change"),
    [
        # Rejected in force by the decoded view (0.60 >= 0.56) and by the shadow (0.50 >=
        # 0.40): the same for the candidate, though its views differ one by one.
        (0.50, 0.60, 0.40, "same"),
        # Rejected in force (0.60, 0.70 >= 0.56) and under a shadow of 0.65 (0.70): same.
        (0.60, 0.70, 0.65, "same"),
        # Passes in force (0.50, 0.52 < 0.56), a shadow of 0.51 rejects the decoded view.
        (0.50, 0.52, 0.51, "would_reject"),
        # Rejected in force by the generated view only; a shadow of 0.65 passes both.
        (0.60, 0.50, 0.65, "would_pass"),
    ],
)
def test_views_of_one_candidate_are_compared_once_by_their_worst(
    generated: float, decoded: float, shadow_identity: float, change: str
) -> None:
    """The engine checks a JPEG candidate as generated and as decoded, and it passes only
    if both pass: the shadow counts that candidate once, judged the same way."""
    in_force = DecisionThresholds(identity=0.56)
    inner = Evidence([_image(0.10), _image(generated), _image(decoded)], in_force)
    counter = Counter()
    shadow = ShadowThresholds(identity=shadow_identity).applied_to(in_force)
    checked = ShadowedFilter(inner, shadow, counter)  # type: ignore[arg-type]
    verdicts = checked.check([np.zeros((4, 4, 3), np.uint8)] * 3, candidates=[0, 1, 1])
    assert len(verdicts) == 3  # one verdict per image, as before
    assert counter.changes == ["same", change]


def test_shadow_overrides_only_what_is_set() -> None:
    in_force = DecisionThresholds(identity=0.5, replica=0.9)
    assert ShadowThresholds(identity=0.6).applied_to(in_force) == DecisionThresholds(0.6, 0.9)
    assert ShadowThresholds(replica=0.8).applied_to(in_force) == DecisionThresholds(0.5, 0.8)
    faces_only = DecisionThresholds(identity=0.5)
    assert ShadowThresholds(replica=0.8).applied_to(faces_only).replica is None
    assert not ShadowThresholds().enabled


@pytest.mark.parametrize(
    ("in_force", "shadow", "change"),
    [
        (True, True, "same"),
        (False, False, "same"),
        (True, False, "would_reject"),
        (False, True, "would_pass"),
    ],
)
def test_change_labels(in_force: bool, shadow: bool, change: str) -> None:
    from filter.decide import ImageVerdict

    def verdict(passed: bool) -> ImageVerdict:
        return ImageVerdict(passed, None, 1, 0.5, None)

    assert shadow_change(verdict(in_force), verdict(shadow)) == change
