"""What may replace the index a server is serving, on reload, and what it may start on:
one decision, apart from the reload machinery (service.reload) that acts on it.

- Not looser without an acknowledgement covering the step (`refused_looser`).
- Not undoing identity edits of the index serving (an erasure back, an opt-out released
  again: a link flipped by hand to an older release) without a rollback recorded against
  that index since this server began serving it (`refused_diverged`).
At startup there is no index serving. Where FACEGATE_INDEX_PATH is a link, startup
compares what it names with the release facegate last published there
(filter.release_record) and refuses to start where serving it would undo that release's
identity edits (`startup_refusal`, applied by `start_live`); thresholds looser than the
defaults are warned about (service.threshold_notices). A folder, or a link no facegate
command has published to since the record existed, is compared with nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filter.index_lineage import (
    changes_undone,
    covering_acknowledgement,
    describe_acknowledgement,
    discard_acknowledged,
    loosenings,
)
from filter.release_record import PublishedRelease, hand_flip, last_published
from service.errors import StartupError
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


def startup_refusal(starting: LiveFilter, published: PublishedRelease | None) -> str | None:
    """Why a server must not start on `starting`, the index a link names (None: it may):
    `published` is the release facegate last put behind that link, read before the index
    was loaded, and `starting` would undo its identity edits: the link was flipped by
    another hand (a rollback published by facegate is what the record names), or a
    facegate command stopped between recording a release and flipping the link to it."""
    flip = hand_flip(published, starting.index.manifest, starting.fingerprint)
    if flip is None:
        return None
    record = flip.published
    return (
        f"{record.link} names index {starting.fingerprint} ({starting.path}), not "
        f"{record.fingerprint}, which facegate published there last ({record.release}, at "
        f"{record.at}; recorded in {record.record}); it was not made from that release, "
        f"and serving it would undo {flip.undone}. Point {record.link} at "
        f"{record.release}, or, if the rollback is intended, point it there and publish "
        f"it with `facegate index publish {starting.path} {record.link} "
        "--discard-live-changes`, which records it"
    )


def start_live(index_path: Path, load: Callable[[], LiveFilter]) -> LiveFilter:
    """The first load of a server, checked by `startup_refusal` where `index_path` is a
    link. The record is read before the load, so that a publish in between (the record
    names what the link will name, then the link flips) is compared as published; if the
    link moved while the index loaded, it loads once more. Raises StartupError, or
    ReleaseRecordError where the record cannot be read."""
    link = Path(index_path)

    def checked() -> tuple[LiveFilter, str | None]:
        published = last_published(link) if link.is_symlink() else None
        live = load()
        return live, startup_refusal(live, published)

    live, refusal = checked()
    if refusal is not None and os.path.realpath(link) != os.path.realpath(live.path):
        live, refusal = checked()
    if refusal is not None:
        raise StartupError(refusal)
    return live
