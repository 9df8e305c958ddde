"""What `index publish` says a release would undo, read from the edit histories
(filter/index_lineage.py `changes_undone`): a recalibration leaves an entry too, so a
rollback across one counts exactly the identity edits made since the release."""

from __future__ import annotations

from filter.index_lineage import changes_undone, edit_record, recalibrated_manifest


def _edited(parent: dict, parent_fingerprint: str, op: str) -> dict:
    return {"edits": [*parent.get("edits", []), edit_record(op, ["x"], parent_fingerprint, None)]}


def test_a_recalibration_names_the_index_it_was_made_from() -> None:
    built = {"index_type": "flat", "looser_acknowledged": {"by": "someone"}}
    recalibrated = recalibrated_manifest(built, "fp-built")
    assert "looser_acknowledged" not in recalibrated  # it was for that release only
    assert [(e["op"], e["from_fingerprint"], e["identities"]) for e in recalibrated["edits"]] == [
        ("calibrate", "fp-built", 0)
    ]


def test_a_rollback_across_a_recalibration_counts_only_the_edits_since_the_release() -> None:
    built: dict = {}
    added = _edited(built, "fp-built", "add")  # fp-added
    recalibrated = recalibrated_manifest(added, "fp-added")  # fp-recal
    removed = _edited(recalibrated, "fp-recal", "remove")  # fp-removed: live
    undone = changes_undone(removed, "fp-removed", added, "fp-added")
    assert undone is not None
    # Without the recalibration's entry the branch was found one step earlier, and the
    # addition both hold was counted as undone too (2 edits, 1 addition).
    assert undone.startswith("1 edit(s)") and "1 removal(s)" in undone
    assert "0 addition(s)" in undone


def test_a_recalibration_alone_is_for_the_threshold_rule_to_judge() -> None:
    added = _edited({}, "fp-built", "add")
    recalibrated = recalibrated_manifest(added, "fp-added")
    assert changes_undone(recalibrated, "fp-recal", added, "fp-added") is None
    # An erasure after it is not.
    removed = _edited(recalibrated, "fp-recal", "remove")
    assert changes_undone(removed, "fp-removed", added, "fp-added") is not None


def test_a_release_made_from_the_recalibrated_index_undoes_nothing() -> None:
    recalibrated = recalibrated_manifest(_edited({}, "fp-built", "add"), "fp-added")
    child = _edited(recalibrated, "fp-recal", "add")
    assert changes_undone(recalibrated, "fp-recal", child, "fp-child") is None


def test_a_calibrate_entry_does_not_hide_a_rebuild_without_a_shared_index() -> None:
    """The live index is a rebuild (its own enrolments, no edit history), recalibrated; the
    release was edited from another index. Publishing it would drop whoever the rebuild
    enrolled: refused, as before recalibrations left an entry."""
    live = recalibrated_manifest({}, "fp-rebuild")
    release = _edited({}, "fp-older", "add")
    undone = changes_undone(live, "fp-rebuild-cal", release, "fp-release")
    assert undone is not None and "a change made there" in undone
    # A rebuild replacing a recalibrated rebuild, neither ever edited, publishes as before.
    assert changes_undone(live, "fp-rebuild-cal", {}, "fp-rebuild-2") is None
