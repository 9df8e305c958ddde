"""Where a threshold is decided: the defaults, the order in which an explicit override,
the calibration saved with an index and a default win, and the record of what judged an
image (`FilterInForce`), which the service signs into content credentials and batch
writes on every manifest row."""

from __future__ import annotations

from dataclasses import dataclass

from filter.decide import DecisionThresholds
from filter.errors import IndexMismatchError
from filter.index import FaissIdentityIndex
from filter.replica import MIN_REPLICA_IMAGES

# Cosine threshold of SFace on real photos; the evidence is in README "Threshold". Other
# embedders and generated galleries need `facegate calibrate --save`.
DEFAULT_IDENTITY_THRESHOLD = 0.40
# Used when the index carries no calibration. Fresh generator samples against a 200-image
# training set stay below it (README "The threshold"). Calibrate (`facegate calibrate
# --save`) for a real training set.
DEFAULT_REPLICA_THRESHOLD = 0.90

OVERRIDE = "override"
INDEX_CALIBRATION = "index calibration"
DEFAULT = "default"


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force and where each came from (logged at startup)."""

    identity: float
    identity_source: str  # OVERRIDE, INDEX_CALIBRATION or DEFAULT
    replica: float | None  # None: the index has no replica features
    replica_source: str | None

    @property
    def decision(self) -> DecisionThresholds:
        return DecisionThresholds(identity=self.identity, replica=self.replica)

    def describe(self) -> str:
        text = f"identity {self.identity} ({self.identity_source})"
        if self.replica is None:
            return text + ", replica off (the index has no replica features)"
        return text + f", replica {self.replica} ({self.replica_source})"


@dataclass(frozen=True)
class FilterInForce:
    """What judged an image: the index (by fingerprint) and the thresholds, with their
    sources. The index can be reloaded between batches, so this travels with a batch's
    outcomes rather than being read from the server's state when the image is released;
    `facegate batch` records it on every manifest row."""

    index_fingerprint: str
    thresholds: Thresholds


def resolve_thresholds(
    index: FaissIdentityIndex,
    identity_override: float | None = None,
    replica_override: float | None = None,
) -> Thresholds:
    """An explicit threshold (flag or FACEGATE_*THRESHOLD) wins; then the calibration saved
    with the index; then the built-in default."""
    saved = index.calibration or {}

    def pick(override: float | None, key: str, default: float) -> tuple[float, str]:
        if override is not None:
            return float(override), OVERRIDE
        if saved.get(key) is not None:
            return float(saved[key]), INDEX_CALIBRATION
        return default, DEFAULT

    identity, identity_source = pick(identity_override, "threshold", DEFAULT_IDENTITY_THRESHOLD)
    if not index.has_replicas:
        if replica_override is not None:
            # The operator asked for a signal this index cannot give: say so, don't ignore it.
            raise IndexMismatchError(
                f"a replica threshold ({replica_override}) is set, but the index has no "
                f"replica features (they need at least {MIN_REPLICA_IMAGES} training "
                "images); unset FACEGATE_REPLICA_THRESHOLD / --replica-threshold, or "
                "rebuild the index from a larger gallery"
            )
        return Thresholds(identity, identity_source, None, None)
    replica, replica_source = pick(replica_override, "replica_threshold", DEFAULT_REPLICA_THRESHOLD)
    return Thresholds(identity, identity_source, replica, replica_source)


def in_force_for(
    index: FaissIdentityIndex,
    identity_override: float | None = None,
    replica_override: float | None = None,
) -> FilterInForce:
    """What would judge images checked against `index` with these overrides."""
    return FilterInForce(
        index.fingerprint, resolve_thresholds(index, identity_override, replica_override)
    )


def pinned_thresholds(index: FaissIdentityIndex, identity: float) -> DecisionThresholds:
    """`identity` as an override and the replica threshold at its default where the index
    has replica features, whatever its saved calibration says: for measurements and tests
    that fix a threshold (not for serving, which resolves)."""
    replica = DEFAULT_REPLICA_THRESHOLD if index.has_replicas else None
    return resolve_thresholds(index, identity, replica).decision
