"""Verdicts: a face matches when its cosine similarity to any indexed vector is at or
above the threshold; an image is rejected when any of its faces matches. An image with
no face follows the no-face policy, `reject` by default (fail closed)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from filter.index import Match


class NoFacePolicy(enum.StrEnum):
    REJECT = "reject"
    PASS = "pass"


class Reason(enum.StrEnum):
    IDENTITY_MATCH = "identity_match"
    NO_FACE = "no_face"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ImageVerdict:
    passed: bool
    reason: Reason | None
    faces: int
    max_similarity: float | None  # operator-only: never sent to API callers
    identity: str | None  # operator-only: the closest identity when it matched
    face_similarities: tuple[float, ...] = ()

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "reject"


def decide(matches: Sequence[Match], threshold: float, no_face: NoFacePolicy) -> ImageVerdict:
    """Verdict for one image from the nearest-identity match of each of its faces."""
    if not matches:
        passed = no_face is NoFacePolicy.PASS
        return ImageVerdict(
            passed=passed,
            reason=None if passed else Reason.NO_FACE,
            faces=0,
            max_similarity=None,
            identity=None,
        )
    best = max(matches, key=lambda m: m.similarity)
    matched = best.similarity >= threshold
    return ImageVerdict(
        passed=not matched,
        reason=Reason.IDENTITY_MATCH if matched else None,
        faces=len(matches),
        max_similarity=best.similarity,
        identity=best.identity if matched else None,
        face_similarities=tuple(m.similarity for m in matches),
    )


def unreadable_verdict() -> ImageVerdict:
    return ImageVerdict(
        passed=False, reason=Reason.UNREADABLE, faces=0, max_similarity=None, identity=None
    )
