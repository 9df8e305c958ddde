"""Threshold calibration on images known not to be in the training set.

With N indexed identities the chance that an unrelated face clears the threshold
against at least one of them compounds (about 1 - (1 - FAR)^N), so a threshold
picked from pairwise statistics rejects far more fresh faces than expected once
the gallery is large. Calibrating on each non-member image's maximum similarity to
the whole index measures that directly.

Two signals reject an image (identity OR replica), so they are calibrated together:
each non-member's score on each signal is turned into its rank among the calibration
set, and both thresholds are set at the same rank, the highest at which the union of
the two rejects at most the target share. Neither signal needs a positive example to
calibrate, and neither takes the whole false-reject budget. The target is the share of
non-members with a usable face (one the filter searched) that the two signals reject;
images with no face, and unusable ones (more faces than the filter searches, an
embedding it cannot trust), are rejected by the filter whatever the thresholds, so no
threshold moves them: they are counted and reported on their own.

Saving a calibration into an index follows one policy (`recalibrated_index`): never
looser than the thresholds the index had without an acknowledgement for that release.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from filter.decide import DecisionThresholds
from filter.errors import FilterError
from filter.index_lineage import accept_looser, recalibrated_manifest

if TYPE_CHECKING:
    from filter.index import FaissIdentityIndex

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class Calibration:
    threshold: float  # identity
    replica_threshold: float | None
    target_false_reject: float
    measured_false_reject: float  # on the calibration set, both signals together
    measured_false_reject_identity: float
    measured_false_reject_replica: float | None
    count: int  # non-member images with a face
    no_face: int
    no_face_share: float
    quantiles: dict[str, float]  # of the identity score
    replica_quantiles: dict[str, float] | None
    mean: float
    max: float
    source: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# The lowest same-person similarity measured per embedder on real photos (README, "The
# threshold": 0.546 on the test photos, 0.50 on 580 public pairs). An identity threshold
# above it may let another photo of an enrolled person pass; calibrate warns.
SAME_PERSON_FLOOR = {"sface": 0.50}


def same_person_floor_warning(embedder: str, identity_threshold: float) -> str | None:
    """Why an identity threshold is risky for this embedder, or None (calibrate, startup
    and every reload say it)."""
    floor = SAME_PERSON_FLOOR.get(embedder)
    if floor is None or identity_threshold <= floor:
        return None
    return (
        f"the identity threshold {identity_threshold:g} is above {floor:g}, the lowest "
        f"same-person similarity measured for {embedder} on real photos (README, 'The "
        "threshold'): another photo of an enrolled person may pass; near-copies are the "
        "replica signal's to catch"
    )


def just_above(value: float) -> float:
    """The smallest float32 above `value`, as a short decimal when one exists: a face
    matches at similarity >= threshold, so a threshold just above a score rejects it not."""
    above = float(np.nextafter(np.float32(value), np.float32(np.inf)))
    for digits in range(2, 9):
        short = round(above, digits)
        if value < short <= above:
            return short
    return above


def _threshold_for_top(sorted_scores: np.ndarray, top: int) -> float:
    """A threshold that rejects the `top` highest scores (ties at the boundary pass)."""
    if top <= 0:
        return min(1.0, just_above(float(sorted_scores[-1])))
    return just_above(float(sorted_scores[len(sorted_scores) - top - 1]))


def calibrate_thresholds(
    identity_scores: np.ndarray,
    replica_scores: np.ndarray | None,
    target_false_reject: float,
    no_face: int = 0,
) -> Calibration:
    """Thresholds at which at most `target_false_reject` of these non-members (images with
    a face) would be rejected by identity or replica."""
    if not 0.0 < target_false_reject < 1.0:
        raise ValueError("target false-reject rate must be between 0 and 1")
    identity = np.asarray(identity_scores, dtype=np.float64)
    if identity.size == 0:
        raise ValueError("no faces found in the non-member set; nothing to calibrate on")
    if not np.isfinite(identity).all():
        raise ValueError("identity scores must be finite")
    replica = None if replica_scores is None else np.asarray(replica_scores, dtype=np.float64)
    if replica is not None and (replica.shape != identity.shape or not np.isfinite(replica).all()):
        raise ValueError("replica scores must be finite, one per identity score")
    n = identity.size
    needed = minimum_faces(target_false_reject)
    if n < needed:
        # With fewer, the budget rounds to zero and the threshold lands just above the
        # highest non-member seen: one outlier would set it, however high.
        raise ValueError(
            f"{n} non-member faces are too few to calibrate a {target_false_reject:g} "
            f"false-reject rate; it needs at least {needed}"
        )
    budget = math.floor(target_false_reject * n + 1e-9)
    sorted_identity = np.sort(identity)
    sorted_replica = None if replica is None else np.sort(replica)

    def thresholds(top: int) -> tuple[float, float | None]:
        t_id = _threshold_for_top(sorted_identity, top)
        t_rep = None if sorted_replica is None else _threshold_for_top(sorted_replica, top)
        return t_id, t_rep

    def rejected(t_id: float, t_rep: float | None) -> np.ndarray:
        hits = identity >= t_id
        if replica is not None and t_rep is not None:
            hits |= replica >= t_rep
        return hits

    # The union's rejections grow with `top`; find the largest `top` within the budget.
    low, high = 0, budget
    while low < high:
        mid = (low + high + 1) // 2
        if int(rejected(*thresholds(mid)).sum()) <= budget:
            low = mid
        else:
            high = mid - 1
    t_id, t_rep = thresholds(low)
    if low == 0:
        # Rank 1 of both signals rejects two images (their highest scores are two
        # different non-members) and the budget is one: both thresholds would land just
        # above the highest scores, rejecting nothing, set by one outlier each.
        raise ValueError(
            f"{n} non-member faces are too few to calibrate a {target_false_reject:g} "
            f"false-reject rate on two signals: the highest identity and replica scores are "
            f"two different images, and a budget of {budget} cannot reject one of each; it "
            f"needs at least {minimum_faces(target_false_reject, replica=True)}"
        )
    for name, value in (("identity", t_id), ("replica", t_rep)):
        if value is not None and value > 1.0:
            raise ValueError(
                f"the {name} threshold would be {value}, above any similarity: non-member "
                "images score 1.0 against the index, so they (or copies of them) are "
                "enrolled; take them out of the non-member set"
            )
    total = int(n + no_face)
    return Calibration(
        threshold=t_id,
        replica_threshold=t_rep,
        target_false_reject=target_false_reject,
        measured_false_reject=float(rejected(t_id, t_rep).mean()),
        measured_false_reject_identity=float((identity >= t_id).mean()),
        measured_false_reject_replica=None
        if replica is None or t_rep is None
        else float((replica >= t_rep).mean()),
        count=int(n),
        no_face=int(no_face),
        no_face_share=no_face / total if total else 0.0,
        quantiles=_quantiles(identity),
        replica_quantiles=None if replica is None else _quantiles(replica),
        mean=float(identity.mean()),
        max=float(identity.max()),
    )


def calibrate_threshold(
    max_similarities: np.ndarray, target_false_reject: float, no_face: int = 0
) -> Calibration:
    """The identity signal alone (an index without replica features)."""
    return calibrate_thresholds(max_similarities, None, target_false_reject, no_face)


def minimum_faces(target_false_reject: float, replica: bool = False) -> int:
    """Non-member faces a calibration needs: a budget of one image, or with the replica
    signal, one image per signal (always enough, whichever images score highest)."""
    signals = 2 if replica else 1
    return math.ceil(signals / target_false_reject - 1e-9)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q * 100:g}": float(np.quantile(values, q)) for q in QUANTILES}


class LooserCalibrationError(FilterError):
    """A calibration looser than the index's thresholds, not acknowledged: not saved."""

    def __init__(self, looser: list[str]) -> None:
        super().__init__("; ".join(looser))
        self.looser = looser


def recalibrated_index(
    index: FaissIdentityIndex,
    calibration: Calibration,
    payload: dict[str, Any],
    *,
    allow_looser: bool,
    by: str,
) -> tuple[FaissIdentityIndex, list[str]]:
    """The index carrying `payload` (the calibration as saved, with its source) and how
    its thresholds are looser than the index's current ones (its calibration, else the
    defaults; [] when they are not). Looser is refused (`LooserCalibrationError`) unless
    `allow_looser`, and then acknowledged in the manifest for this release only
    (filter.index_lineage), so that a server watching the index reloads it knowingly."""
    from filter.index_release import index_thresholds

    before = index_thresholds(index)
    after = DecisionThresholds(calibration.threshold, calibration.replica_threshold)
    # The manifest drops the index's own acknowledgement (it was for that release only)
    # and names the index it was recalibrated from.
    manifest = recalibrated_manifest(index.manifest, index.fingerprint)
    looser = accept_looser(
        manifest,
        before=before,
        after=after,
        allowed=allow_looser,
        by=by,
        replaces=index.fingerprint,
        refuse=LooserCalibrationError,
    )
    saved = index.with_calibration(payload)
    saved.manifest = manifest
    return saved, looser
