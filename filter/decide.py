"""Verdicts from the filter's evidence about one image.

Two signals reject an image:
- identity: a face whose cosine similarity to any enrolled face is at or above the
  identity threshold (a lookalike of a training identity);
- replica: the whole image's low-frequency similarity to any enrolled training image is
  at or above the replica threshold (a near-copy of a training image, face or not).

Everything that is not positive evidence of a safe image rejects it (fail closed): more
faces than the filter searches in one image, a similarity that is not finite, a search
that found no neighbour, an embedding the filter could not trust, or an image whose
geometry the detector cannot search. An image with no face follows the no-face policy,
`reject` by default.

When several reasons hold, the verdict names the first of: identity_match, replica,
too_many_faces, unsupported_geometry, filter_error, no_face (`unreadable` is decided
before any evidence exists). A match found is the most useful thing to report and the
strongest; an image the filter could not search whole comes next.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from filter.vector_table import Match


class NoFacePolicy(enum.StrEnum):
    REJECT = "reject"
    PASS = "pass"


class Reason(enum.StrEnum):
    IDENTITY_MATCH = "identity_match"
    REPLICA = "replica"
    NO_FACE = "no_face"
    UNREADABLE = "unreadable"
    UNSUPPORTED_GEOMETRY = "unsupported_geometry"
    FILTER_ERROR = "filter_error"
    # A file holds bytes the content rule could not account for (data after the end
    # marker, a chunk or segment it does not read, a thumbnail it cannot decode): what
    # they would show was never checked (filter.content).
    UNCHECKED_CONTENT = "unchecked_content"
    # More faces than the filter searches in one image (DetectorSettings.max_faces): none
    # was searched, so the image cannot be vouched for (filter.identity_filter).
    TOO_MANY_FACES = "too_many_faces"


# Worst first: the verdict of a file that shows several images (frames, pages,
# thumbnails) is the worst of theirs, in this order; None is a pass. Positive evidence of
# a training identity outranks everything, so an operator sees the match; content that was
# never checked outranks every "could not check" and the no-face policy (a `pass` policy
# never releases bytes nobody looked at). New reasons take their place in this one tuple.
SEVERITY: tuple[Reason | None, ...] = (
    Reason.IDENTITY_MATCH,
    Reason.REPLICA,
    Reason.TOO_MANY_FACES,
    Reason.UNCHECKED_CONTENT,
    Reason.UNSUPPORTED_GEOMETRY,
    Reason.FILTER_ERROR,
    Reason.UNREADABLE,
    Reason.NO_FACE,
    None,
)


def severity(reason: Reason | None) -> int:
    """Rank of a reason in SEVERITY: 0 is the worst."""
    return SEVERITY.index(reason)


def verdict_rank(verdict: ImageVerdict) -> int:
    """Rank of a verdict in SEVERITY (a pass ranks last): `min(..., key=verdict_rank)` is
    the worst of several views of one thing, the first of them on a tie."""
    if verdict.passed:
        return severity(None)
    # A rejection that gives no reason is still a rejection: ranked with a pass, it lost
    # the tie to a pass of another view of the same image, which was then released.
    return severity(verdict.reason or Reason.FILTER_ERROR)


@dataclass(frozen=True)
class DecisionThresholds:
    """Thresholds in force; `replica` is None when the index has no replica features."""

    identity: float
    replica: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("identity", self.identity), ("replica", self.replica)):
            if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
                raise ValueError(f"{name} threshold {value} is outside [-1, 1]")


@dataclass(frozen=True)
class ImageEvidence:
    """What the filter measured on one image, before any threshold is applied."""

    face_matches: Sequence[Match]  # nearest enrolled identity of each face
    replica: Match | None = None  # nearest enrolled training image (whole image)
    searchable: bool = True  # False: the detector cannot search this geometry
    error: str | None = None  # why the filter could not produce trustworthy evidence
    # Faces found but not searched, because the image holds more than `face_limit`.
    unsearched_faces: int = 0
    face_limit: int | None = None

    @property
    def faces(self) -> int:
        return len(self.face_matches) + self.unsearched_faces


@dataclass(frozen=True)
class ImageVerdict:
    passed: bool
    reason: Reason | None
    faces: int
    max_similarity: float | None  # operator-only: never sent to API callers
    identity: str | None  # operator-only: the matched identity when rejected by a signal
    face_similarities: tuple[float, ...] = ()
    replica_similarity: float | None = None  # operator-only
    detail: str | None = None  # operator-only: why a filter_error happened

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "reject"


def _trusted(match: Match) -> bool:
    return match.identity is not None and math.isfinite(match.similarity)


def decide(
    evidence: ImageEvidence, thresholds: DecisionThresholds, no_face: NoFacePolicy
) -> ImageVerdict:
    """Verdict for one image; every path that is not a clear pass rejects."""
    similarities = tuple(m.similarity for m in evidence.face_matches)
    trusted = [m for m in evidence.face_matches if _trusted(m)]
    best = max(trusted, key=lambda m: m.similarity) if trusted else None
    replica = evidence.replica

    def verdict(
        reason: Reason, identity: str | None = None, detail: str | None = None
    ) -> ImageVerdict:
        return ImageVerdict(
            passed=False,
            reason=reason,
            faces=evidence.faces,
            max_similarity=None if best is None else best.similarity,
            identity=identity,
            face_similarities=similarities,
            replica_similarity=None if replica is None else replica.similarity,
            detail=detail,
        )

    # A real match is reported as one even when another face of the image failed.
    if best is not None and best.similarity >= thresholds.identity:
        return verdict(Reason.IDENTITY_MATCH, best.identity)
    copied = replica if replica is not None and _trusted(replica) else None
    replica_threshold = thresholds.replica
    if (
        replica_threshold is not None
        and copied is not None
        and copied.similarity >= replica_threshold
    ):
        return verdict(Reason.REPLICA, copied.identity)
    if evidence.unsearched_faces:
        limit = "" if evidence.face_limit is None else f" {evidence.face_limit}"
        return verdict(
            Reason.TOO_MANY_FACES,
            detail=f"{evidence.faces} faces found, more than the{limit} the filter "
            "searches in one image",
        )
    if not evidence.searchable:
        return verdict(Reason.UNSUPPORTED_GEOMETRY)
    if evidence.error is not None:
        return verdict(Reason.FILTER_ERROR, detail=evidence.error)
    if len(trusted) != len(evidence.face_matches):
        return verdict(Reason.FILTER_ERROR, detail="a face had no finite nearest neighbour")
    if replica_threshold is not None and copied is None:
        return verdict(Reason.FILTER_ERROR, detail="no finite nearest training image")
    if not evidence.face_matches and no_face is NoFacePolicy.REJECT:
        return verdict(Reason.NO_FACE)
    return ImageVerdict(
        passed=True,
        reason=None,
        faces=evidence.faces,
        max_similarity=None if best is None else best.similarity,
        identity=None,
        face_similarities=similarities,
        replica_similarity=None if replica is None else replica.similarity,
    )


def unchecked_verdict(detail: str, faces: int = 0) -> ImageVerdict:
    """A file some of whose bytes the content rule could not account for."""
    return ImageVerdict(
        passed=False,
        reason=Reason.UNCHECKED_CONTENT,
        faces=faces,
        max_similarity=None,
        identity=None,
        detail=detail,
    )


def unreadable_verdict() -> ImageVerdict:
    return ImageVerdict(
        passed=False, reason=Reason.UNREADABLE, faces=0, max_similarity=None, identity=None
    )


# Metric label values of a candidate's verdict and of a shadow comparison (small fixed
# sets, exported by service.metrics; deploy/prometheus rules and dashboards read them).
ACCEPTED = "accepted"
REJECTED_ERROR = "rejected_error"
_OUTCOME_BY_REASON = {
    Reason.IDENTITY_MATCH: "rejected_identity",
    Reason.REPLICA: "rejected_replica",
    Reason.NO_FACE: "rejected_no_face",
    Reason.TOO_MANY_FACES: "rejected_too_many_faces",
}
CANDIDATE_OUTCOMES = (ACCEPTED, *_OUTCOME_BY_REASON.values(), REJECTED_ERROR)


def verdict_outcome(verdict: ImageVerdict) -> str:
    """Metric label of a candidate: accepted, rejected_identity, rejected_replica,
    rejected_no_face, rejected_too_many_faces (more faces than the filter searches in one
    image), or rejected_error (anything else the filter could not vouch for)."""
    if verdict.passed:
        return ACCEPTED
    if verdict.reason is None:
        return REJECTED_ERROR
    return _OUTCOME_BY_REASON.get(verdict.reason, REJECTED_ERROR)


SAME = "same"
WOULD_REJECT = "would_reject"  # in force: pass; shadow: reject
WOULD_PASS = "would_pass"  # in force: reject; shadow: pass
SHADOW_CHANGES = (SAME, WOULD_REJECT, WOULD_PASS)


def shadow_change(in_force: ImageVerdict, shadow: ImageVerdict) -> str:
    """How the shadow verdict compares with the verdict in force (filter.shadow)."""
    if in_force.passed == shadow.passed:
        return SAME
    return WOULD_REJECT if in_force.passed else WOULD_PASS
