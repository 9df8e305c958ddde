"""What the service reports about the index it serves: the facts of the live index and
the result of a reload. Value types only: service.reload produces them, service.metrics
(a leaf) exports them without importing the reload machinery."""

from __future__ import annotations

from dataclasses import dataclass

# The `result` label of facegate_index_reloads.
RELOAD_SUCCESS = "success"
RELOAD_FAILURE = "failure"
RELOAD_REFUSED_LOOSER = "refused_looser"
RELOAD_REFUSED_DIVERGED = "refused_diverged"
RELOAD_RESULTS = (RELOAD_SUCCESS, RELOAD_FAILURE, RELOAD_REFUSED_LOOSER, RELOAD_REFUSED_DIVERGED)


@dataclass(frozen=True)
class LiveIndexFacts:
    """The index and thresholds in force, as the metrics show them."""

    fingerprint: str
    format_version: str
    index_type: str
    calibrated: bool
    identities: int
    vectors: int
    identity_threshold: float
    replica_threshold: float | None  # None: the index has no replica features
    shadow_identity: float | None  # None: no shadow threshold for that signal
    shadow_replica: float | None
    loaded_at: float  # Unix time
