"""What an index carries from the index it was made from, and when a release is looser.

An index is edited (`index add`, `index remove`), recalibrated (`calibrate --save`) and
published (`index publish`); a server reloads it. None of these may silently loosen the
filter: a release whose identity threshold or replica threshold is higher than the one it
replaces, or whose replica signal is off where it was on, is *looser*, and is accepted only
with an acknowledgement given for that very release and recorded in its manifest
(`looser_acknowledged`), and only for a step within the one it names (`before` -> `after`):
a rollback to it after a stricter release went live is refused again. The reference each
path compares with:

- `calibrate --save`: the thresholds the index had (its calibration, else the defaults);
- `index publish`: the index the link points to now;
- a reload: the thresholds the server is serving now.

Nor may any of them silently undo an identity edit: `index publish` refuses a release not
made from the live index when that would undo edits made there (`changes_undone`), and a
server refuses to reload one, unless the release records that the operator chose the
rollback against that very index (`index publish --discard-live-changes`:
`discards_live_changes`; its copy keeps the lineage of the release it copies). A link
flipped by hand to an older release is refused by every server that reloads it, and by
one that restarts on it, which compares it with the release facegate last published at
the link (filter.release_record).

Manifest fields across a change, in one place (`EDIT_FIELDS`, `RELEASE_ONLY_FIELDS`):

| field | `index add` / `remove` | `calibrate --save` |
|---|---|---|
| calibration (`calibration.json`) | carried, noted as carried | replaced |
| `edits` (history) | carried (counts, keyed hashes), plus this edit | carried, plus `calibrate` |
| `built_at`, `compute` (the edit records its own) | carried | carried |
| `looser_acknowledged`, `discards_live_changes` | dropped: for one release | dropped, or anew |
| everything else | rebuilt from the edited tables | carried |

Edit records name no one: an edit records how many identities it added or removed and,
with the operator's key (FACEGATE_SEED_KEY_FILE), their keyed hashes, derived as the audit
log's (`filter.keys`), so `facegate audit hash LABEL` finds a person in both.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from typing import Any

from filter.decide import DecisionThresholds
from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest

LOOSER_ACK = "looser_acknowledged"
DISCARD_ACK = "discards_live_changes"
EDITS = "edits"
# The `op` of a recalibration's history entry: it links the recalibrated index to the one
# it was made from, so that publish finds the branch exactly; it changes no identity.
CALIBRATE = "calibrate"
IDENTITY_EDITS = ("add", "remove")
# Fields an edited index takes over from the index it came from as they are. Fields a
# change must draw anew (a per-release salt, say) go in EDIT_ROLLED with their maker.
EDIT_FIELDS = ("built_at", "compute")
EDIT_ROLLED: dict[str, Any] = {}
# Fields given for one release only: neither an edited nor a recalibrated index keeps them.
RELEASE_ONLY_FIELDS = (LOOSER_ACK, DISCARD_ACK)
# Thresholds are floats written to JSON and read back: equal within this is equal.
TOLERANCE = 1e-9
# When a record was made (UTC, whole seconds), as every record here and beside a link says.
RECORD_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_stamp() -> str:
    """Now, in RECORD_TIME_FORMAT."""
    return time.strftime(RECORD_TIME_FORMAT, time.gmtime())


def loosenings(before: DecisionThresholds, after: DecisionThresholds) -> list[str]:
    """How `after` is looser than `before`, one phrase per signal ([] when it is not)."""
    out = []
    if after.identity > before.identity + TOLERANCE:
        out.append(f"identity threshold {before.identity:g} -> {after.identity:g}")
    if before.replica is not None:
        if after.replica is None:
            out.append(f"replica threshold {before.replica:g} -> off")
        elif after.replica > before.replica + TOLERANCE:
            out.append(f"replica threshold {before.replica:g} -> {after.replica:g}")
    return out


def acknowledgement(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The release's acknowledgement that it may be looser than what it replaces."""
    ack = manifest.get(LOOSER_ACK)
    return ack if isinstance(ack, dict) else None


def covering_acknowledgement(
    manifest: dict[str, Any], before: DecisionThresholds, after: DecisionThresholds
) -> dict[str, Any] | None:
    """The release's acknowledgement if it covers loosening `before` -> `after` (else None).

    An acknowledgement was given for one step, from the thresholds it names as `before` to
    those it names as `after`. It covers a step that starts no stricter than its `before`
    and ends no looser than its `after`: rolling back to a looser release after a stricter
    one went live loosens further than anyone acknowledged, and is refused."""
    ack = acknowledgement(manifest)
    if ack is None:
        return None
    try:
        acked_before = _read_thresholds(ack["before"])
        acked_after = _read_thresholds(ack["after"])
    except (KeyError, TypeError, ValueError):
        return None  # an acknowledgement that does not say what it covers covers nothing
    if loosenings(before, acked_before) or loosenings(acked_after, after):
        return None
    return ack


def acknowledge(
    manifest: dict[str, Any],
    *,
    by: str,
    replaces: str | None,
    before: DecisionThresholds,
    after: DecisionThresholds,
) -> None:
    """Record in `manifest` that this release is accepted although looser (who said so,
    when, and against which index and thresholds)."""
    manifest[LOOSER_ACK] = {
        "by": by,
        "at": utc_stamp(),
        "replaces_fingerprint": replaces,
        "before": _thresholds(before),
        "after": _thresholds(after),
        "changes": loosenings(before, after),
    }


def accept_looser(
    manifest: dict[str, Any],
    *,
    before: DecisionThresholds,
    after: DecisionThresholds,
    allowed: bool,
    by: str,
    replaces: str | None,
    refuse: Callable[[list[str]], Exception],
) -> list[str]:
    """The one rule for every way a release replaces another (calibrate --save, index
    publish, index build over an index): a release whose thresholds (`after`) are looser
    than those it replaces (`before`) is refused, `refuse(looser)` raised, unless its
    `manifest` already holds an acknowledgement that covers the step, or the operator
    allows it: then one is recorded in `manifest` (who, when, which index it replaces, the
    step). Returns how it is looser ([] when it is not)."""
    looser = loosenings(before, after)
    if not looser or covering_acknowledgement(manifest, before, after) is not None:
        return looser
    if not allowed:
        raise refuse(looser)
    acknowledge(manifest, by=by, replaces=replaces, before=before, after=after)
    return looser


def _thresholds(thresholds: DecisionThresholds) -> dict[str, float | None]:
    return {"identity": thresholds.identity, "replica": thresholds.replica}


def _read_thresholds(recorded: Any) -> DecisionThresholds:
    identity, replica = recorded["identity"], recorded["replica"]
    for value in (identity, replica):
        if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
            raise TypeError(f"{value!r} is not a threshold")
    if identity is None:
        raise TypeError("no identity threshold")
    return DecisionThresholds(float(identity), None if replica is None else float(replica))


def describe_acknowledgement(ack: dict[str, Any]) -> str:
    return f"acknowledged by `{ack.get('by')}` at {ack.get('at')}"


def identity_hashes(identities: Sequence[str], key: bytes | None) -> list[str] | None:
    """Keyed pseudonyms of identity labels (the audit log's derivation); None without a key."""
    if key is None:
        return None
    subkey = derive_subkey(key, AUDIT_IDENTITY)
    return sorted(identity_digest(subkey, label) for label in identities)


def edit_record(
    operation: str, identities: Sequence[str], from_fingerprint: str, key: bytes | None
) -> dict[str, Any]:
    """One entry of the `edits` history: what was done, to how many, keyed hashes only."""
    record: dict[str, Any] = {
        "op": operation,
        "identities": len(set(identities)),
        "from_fingerprint": from_fingerprint,
        "at": utc_stamp(),
    }
    hashes = identity_hashes(sorted(set(identities)), key)
    if hashes is not None:
        record["identity_hashes"] = hashes
    return record


def scrubbed_history(history: object, key: bytes | None) -> list[dict[str, Any]]:
    """The `edits` history with no label left in it: entries written before edits were
    pseudonymous (a list of names) become a count, and keyed hashes with a key."""
    out: list[dict[str, Any]] = []
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict):
            continue
        entry = dict(entry)
        names = entry.get("identities")
        if isinstance(names, list):
            labels = sorted({str(name) for name in names})
            entry["identities"] = len(labels)
            hashes = identity_hashes(labels, key)
            if hashes is not None:
                entry["identity_hashes"] = hashes
        out.append(entry)
    return out


def edited_manifest(
    parent: dict[str, Any], rebuilt: dict[str, Any], record: dict[str, Any], key: bytes | None
) -> dict[str, Any]:
    """The manifest of an edited index: `rebuilt` (from the edited tables) plus what it
    takes from `parent` (EDIT_FIELDS, the history) and what is drawn anew (EDIT_ROLLED)."""
    manifest = dict(rebuilt)
    for name in EDIT_FIELDS:
        if name in parent:
            manifest[name] = parent[name]
    for name, make in EDIT_ROLLED.items():
        manifest[name] = make()
    manifest[EDITS] = [*scrubbed_history(parent.get(EDITS), key), record]
    for name in RELEASE_ONLY_FIELDS:
        manifest.pop(name, None)
    return manifest


def recalibrated_manifest(parent: dict[str, Any], parent_fingerprint: str) -> dict[str, Any]:
    """The manifest a recalibrated index starts from: the parent's, minus what was given
    for the parent release only, plus a history entry naming the parent."""
    manifest = {k: v for k, v in parent.items() if k not in RELEASE_ONLY_FIELDS}
    manifest[EDITS] = [*_history(parent), edit_record(CALIBRATE, [], parent_fingerprint, None)]
    return manifest


def carried_calibration(
    calibration: dict[str, Any], operation: str, from_fingerprint: str
) -> dict[str, Any]:
    """The parent's calibration, kept by an edit: its thresholds still apply (adding
    identities can only make them reject more; removing, less often a stranger), but the
    rates it measured were measured on the parent, which it says."""
    carried = dict(calibration)
    history = list(carried.get("carried_through", []))
    history.append({"op": operation, "from_fingerprint": from_fingerprint})
    carried["carried_through"] = history
    return carried


def made_from(manifest: dict[str, Any], fingerprint: str) -> bool:
    """Whether the index of `manifest` was edited from (a descendant of) `fingerprint`."""
    return any(entry.get("from_fingerprint") == fingerprint for entry in _history(manifest))


def lineage_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """All of a manifest that `changes_undone` reads (its edit history and its rollback
    record), to judge a release whose folder may be gone: filter.release_record keeps it."""
    return {key: manifest[key] for key in (EDITS, DISCARD_ACK) if key in manifest}


def changes_undone(
    live: dict[str, Any], live_fingerprint: str, new: dict[str, Any], new_fingerprint: str
) -> str | None:
    """What replacing the live index by `new` would undo, said for the operator (None:
    nothing). `new` must have been made from the live index (its edit history names it),
    or share an index with it since which the live one was only recalibrated (the
    threshold rule judges that), or neither was ever edited (a rebuild replacing a
    rebuild): otherwise whatever changed the live index since `new` was made from an
    older one (an erasure, an opt-out, a rebuild) would silently be gone."""
    # A rollback's copy is the release it copies plus the record of the rollback (another
    # fingerprint): for lineage it is that release.
    live_names = {name for name in (live_fingerprint, _copy_of(live)) if name}
    new_names = {name for name in (new_fingerprint, _copy_of(new)) if name}
    if live_names & new_names or any(made_from(new, name) for name in live_names):
        return None
    since, branched = _edits_since_branch(
        _history(live),
        _copy_of(live) or live_fingerprint,
        _history(new),
        _copy_of(new) or new_fingerprint,
    )
    live_edits = [e for e in since if e.get("op") in IDENTITY_EDITS]
    if not live_edits:
        if branched:
            return None  # recalibrations since a shared index: the threshold rule's to judge
        if not _identity_history(new) and not _identity_history(live):
            return None  # neither ever edited (a rebuild replacing a rebuild, recalibrated or not)
        # The live index changed in a way its history does not say: a rebuild, or a
        # recalibration saved before they left a record.
        return "a change made there since this index was made from an earlier one"
    removals = sum(1 for e in live_edits if e.get("op") == "remove")
    additions = sum(1 for e in live_edits if e.get("op") == "add")
    return (
        f"{len(live_edits)} edit(s) made to the live index since the one this index was "
        f"made from: {removals} removal(s), whose identities would be back, and "
        f"{additions} addition(s), whose identities would be released again"
    )


def acknowledge_discard(
    manifest: dict[str, Any], *, by: str, replaces: str, undone: str, copy_of: str
) -> None:
    """Record in `manifest` that this release replaces the index `replaces` knowingly,
    undoing `undone` (a rollback): who said so and when, and which release it is a copy of
    (`copy_of`: the record changes the fingerprint, not the lineage)."""
    manifest[DISCARD_ACK] = {
        "by": by,
        "at": utc_stamp(),
        "replaces_fingerprint": replaces,
        "undoes": undone,
        "copy_of": _copy_of(manifest) or copy_of,
    }


def _copy_of(manifest: dict[str, Any]) -> str | None:
    ack = manifest.get(DISCARD_ACK)
    original = ack.get("copy_of") if isinstance(ack, dict) else None
    return original if isinstance(original, str) and original else None


def discard_acknowledged(
    manifest: dict[str, Any], replaces: str, serving_since: float | None = None
) -> dict[str, Any] | None:
    """The release's acknowledgement that it may undo the edits of the index `replaces`
    (None: it has none for that index; one given against another index covers nothing).
    With `serving_since` (when a server began serving `replaces`), one recorded before
    then covers nothing either: it was given for an earlier time that index served, before
    a roll forward brought it back (a hand flip to the old rollback would undo it again).
    The record has whole seconds, hence one second of grace; a clock behind refuses."""
    ack = manifest.get(DISCARD_ACK)
    if not isinstance(ack, dict) or ack.get("replaces_fingerprint") != replaces:
        return None
    if serving_since is not None and _recorded_at(ack) + 1 < serving_since:
        return None
    return ack


def _recorded_at(ack: dict[str, Any]) -> float:
    try:
        return float(calendar.timegm(time.strptime(str(ack.get("at")), RECORD_TIME_FORMAT)))
    except ValueError:
        return float("-inf")  # no readable time: as old as can be


def _edits_since_branch(
    live: list[dict[str, Any]],
    live_fingerprint: str,
    new: list[dict[str, Any]],
    new_fingerprint: str,
) -> tuple[list[dict[str, Any]], bool]:
    """The live index's edits that `new` does not hold, found by fingerprints (two records
    of one second and count, without a key, are equal dicts): after `new` itself when the
    live index was edited from it (a rollback), else after the latest index both started
    an edit from; all of them when `new` names none of the live index's ancestors (the
    second value says whether a shared index was found). A recalibration leaves a
    `calibrate` entry; one made before they did leaves none, and across it this counts
    from further back (at most the live index's history)."""
    for position, edit in enumerate(live):
        if edit.get("from_fingerprint") == new_fingerprint:
            return live[position:], True
    live_after = [e.get("from_fingerprint") for e in live[1:]] + [live_fingerprint]
    new_after = [e.get("from_fingerprint") for e in new[1:]] + [new_fingerprint]
    for index in reversed(range(len(new))):
        branch = new[index].get("from_fingerprint")
        for position, edit in enumerate(live):
            if edit.get("from_fingerprint") == branch:
                shared = live_after[position] == new_after[index]  # the same edit
                return (live[position + 1 :] if shared else live[position:]), True
    return [edit for edit in live if edit not in new], False


def _identity_history(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in _history(manifest) if e.get("op") != CALIBRATE]


def _history(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    history = manifest.get(EDITS)
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []
