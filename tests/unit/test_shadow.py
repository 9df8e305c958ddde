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
