"""What a server says about thresholds looser than the defaults or the index's own, at
start and on every reload (service.reload refuses a looser reload; these only speak)."""

from __future__ import annotations

from filter.decide import DecisionThresholds
from filter.index import FaissIdentityIndex
from filter.index_lineage import covering_acknowledgement, describe_acknowledgement, loosenings
from filter.thresholds import (
    DEFAULT_IDENTITY_THRESHOLD,
    DEFAULT_REPLICA_THRESHOLD,
    OVERRIDE,
    Thresholds,
    resolve_thresholds,
)


def default_thresholds(index: FaissIdentityIndex) -> DecisionThresholds:
    """What a server applies to `index` with neither a calibration nor an override."""
    return DecisionThresholds(
        DEFAULT_IDENTITY_THRESHOLD, DEFAULT_REPLICA_THRESHOLD if index.has_replicas else None
    )


def override_warnings(index: FaissIdentityIndex, thresholds: Thresholds) -> list[str]:
    """An explicit threshold looser than the index's own (its calibration, else the
    default) or than the default: allowed, as the operator's choice, but never quietly."""
    own, default = resolve_thresholds(index).decision, default_thresholds(index)
    out = []
    for variable, value, source, references in (
        ("FACEGATE_THRESHOLD", thresholds.identity, thresholds.identity_source,
         {"the index's own": own.identity, "the default": default.identity}),
        ("FACEGATE_REPLICA_THRESHOLD", thresholds.replica, thresholds.replica_source,
         {"the index's own": own.replica, "the default": default.replica}),
    ):  # fmt: skip
        looser = [
            f"{name} {ref:g}"
            for name, ref in references.items()
            if ref is not None and value is not None and value > ref
        ]
        if source == OVERRIDE and looser:
            out.append(
                f"{variable}={value:g} is looser than {' and '.join(looser)}: images closer "
                "to a training identity are released. It pins every index reloaded later too"
            )
    return out


def startup_looser_warning(index: FaissIdentityIndex, thresholds: Thresholds) -> str:
    """What a server starting on `index` must say where the thresholds it brings (its
    calibration; explicit overrides are warned about by `override_warnings`) are looser
    than the defaults ("" where they are not).

    A start is not refused for it, as a reload is: a restart cannot know what served
    before, and an index edited (`index add`/`remove`) or recalibrated looser twice keeps a
    looser calibration without an acknowledgement reaching back to the defaults, so a
    refusal would stop every restart of an index its operator accepted. It is never
    quiet: a warning names the step and whether an acknowledgement covers it."""
    default = default_thresholds(index)
    brought = DecisionThresholds(
        default.identity if thresholds.identity_source == OVERRIDE else thresholds.identity,
        default.replica if thresholds.replica_source == OVERRIDE else thresholds.replica,
    )
    looser = loosenings(default, brought)
    if not looser:
        return ""
    step = f"index {index.fingerprint} is looser than the defaults ({'; '.join(looser)})"
    ack = covering_acknowledgement(index.manifest, default, brought)
    if ack is not None:
        return f"{step}, {describe_acknowledgement(ack)}"
    return (
        f"{step}, and no acknowledgement in it covers that step (a reload onto it from the "
        "defaults would be refused): if that is not intended, publish a stricter release; "
        "if it is, acknowledge it with `facegate index publish --allow-looser` or "
        "`calibrate --save --allow-looser`, or set FACEGATE_THRESHOLD / "
        "FACEGATE_REPLICA_THRESHOLD explicitly"
    )
