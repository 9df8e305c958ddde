"""What may replace the index a server is serving, on reload: one decision, apart from the
reload machinery (service.reload) that acts on it.

- Not looser without an acknowledgement covering the step (`refused_looser`).
- Not undoing identity edits of the index serving (an erasure back, an opt-out released
  again: a link flipped by hand to an older release) without a rollback recorded against
  that index since this server began serving it (`refused_diverged`).
Startup has nothing to compare with and applies neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from filter.index_lineage import (
    changes_undone,
    covering_acknowledgement,
    describe_acknowledgement,
    discard_acknowledged,
    loosenings,
)
from service.live_index import RELOAD_REFUSED_DIVERGED, RELOAD_REFUSED_LOOSER

if TYPE_CHECKING:
    from service.reload import LiveFilter

log = logging.getLogger("facegate.reload")


@dataclass(frozen=True)
class Refusal:
    result: str  # the reload metric's label
    reason: str


def looser_refusal(serving: LiveFilter, loaded: LiveFilter) -> str | None:
    """Why `loaded` must not replace `serving`: its thresholds are looser and it carries no
    acknowledgement covering this step (None: it may)."""
    before, after = serving.thresholds.decision, loaded.thresholds.decision
    looser = loosenings(before, after)
    if not looser:
        return None
    ack = covering_acknowledgement(loaded.index.manifest, before, after)
    if ack is not None:
        log.warning(
            "index %s loosens the filter (%s), %s",
            loaded.fingerprint,
            "; ".join(looser),
            describe_acknowledgement(ack),
        )
        return None
    return (
        f"its thresholds are looser than those serving ({'; '.join(looser)}) and it carries "
        "no acknowledgement covering this step (one given against a looser predecessor does "
        "not cover a step from stricter thresholds): publish it with `facegate index "
        "publish --allow-looser` (or save its calibration with `calibrate --save "
        "--allow-looser`) if that is intended"
    )


def release_refusal(serving: LiveFilter, loaded: LiveFilter) -> Refusal | None:
    """Why `loaded` must not replace `serving` (None: it may): it would undo identity edits
    of the index serving without a rollback recorded against that index (a link flipped
    by hand to an older release), or it is looser without an acknowledgement."""
    undone = changes_undone(
        serving.index.manifest, serving.fingerprint, loaded.index.manifest, loaded.fingerprint
    )
    if undone is not None:
        ack = discard_acknowledged(
            loaded.index.manifest, serving.fingerprint, serving_since=serving.loaded_at
        )
        if ack is None:
            return Refusal(
                RELOAD_REFUSED_DIVERGED,
                f"it was not made from the index serving, and serving it would undo {undone}"
                " (a rollback it records against that index, if any, predates this server's "
                "load of it). Make it again from the index serving, or, if the rollback is "
                "intended, "
                f"point the link back at {serving.path} and publish it with `facegate index "
                "publish OLDER LINK --discard-live-changes`, which records it (where "
                "FACEGATE_INDEX_PATH is a folder, a restart serves it: startup compares "
                "with nothing)",
            )
        log.warning(
            "index %s undoes %s, as `%s` recorded at %s",
            loaded.fingerprint,
            ack.get("undoes", "changes of the index serving"),
            ack.get("by", "?"),
            ack.get("at", "?"),
        )
    looser = looser_refusal(serving, loaded)
    return None if looser is None else Refusal(RELOAD_REFUSED_LOOSER, looser)
