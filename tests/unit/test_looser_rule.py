"""The one rule every replacement of a release goes through (filter/index_lineage.py
`accept_looser`): calibrate --save, index publish and index build over an index."""

from __future__ import annotations

import pytest

from filter.decide import DecisionThresholds
from filter.index_lineage import LOOSER_ACK, accept_looser

STRICT = DecisionThresholds(0.40, 0.80)


class Refused(Exception):
    pass


def _accept(manifest: dict, after: DecisionThresholds, allowed: bool) -> list[str]:
    return accept_looser(
        manifest, before=STRICT, after=after, allowed=allowed, by="test", replaces="fp-live",
        refuse=lambda looser: Refused("; ".join(looser)),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("after", "phrase"),
    [
        (DecisionThresholds(0.45, 0.80), "identity threshold 0.4 -> 0.45"),
        (DecisionThresholds(0.40, 0.85), "replica threshold 0.8 -> 0.85"),
        (DecisionThresholds(0.40, None), "replica threshold 0.8 -> off"),
    ],
)
def test_a_looser_release_is_refused_unless_allowed_and_then_recorded(
    after: DecisionThresholds, phrase: str
) -> None:
    manifest: dict = {}
    with pytest.raises(Refused, match=phrase):
        _accept(manifest, after, allowed=False)
    assert manifest == {}  # nothing recorded for a refusal
    assert _accept(manifest, after, allowed=True) == [phrase]
    ack = manifest[LOOSER_ACK]
    assert (ack["by"], ack["replaces_fingerprint"], ack["changes"]) == ("test", "fp-live", [phrase])


def test_a_stricter_or_equal_release_needs_nothing_and_records_nothing() -> None:
    for after in (STRICT, DecisionThresholds(0.35, 0.75)):
        manifest: dict = {}
        assert _accept(manifest, after, allowed=False) == []
        assert manifest == {}


def test_an_acknowledgement_covers_its_own_step_only() -> None:
    looser = DecisionThresholds(0.45, 0.80)
    manifest: dict = {}
    _accept(manifest, looser, allowed=True)
    recorded = dict(manifest[LOOSER_ACK])
    # The same step again (a rollback to this release): covered, not recorded anew.
    assert _accept(manifest, looser, allowed=False) == ["identity threshold 0.4 -> 0.45"]
    assert manifest[LOOSER_ACK] == recorded
    # A step further than the one acknowledged is not covered.
    with pytest.raises(Refused):
        accept_looser(
            manifest, before=DecisionThresholds(0.30, 0.80), after=looser, allowed=False,
            by="test", replaces="fp-other", refuse=lambda looser: Refused(str(looser)),
        )  # fmt: skip
