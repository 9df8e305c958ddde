"""The record of the release facegate last put behind a link.

Every facegate command that flips a link (`index publish`, and `index add|remove` and
`calibrate --save` through a link) records, in `.<link>.published` beside it, which
release it puts there: just before the flip, so that a flip never goes unrecorded (a
crash in between leaves the record ahead of the link, which fails closed). A link flipped
by any other hand leaves the record as it was. A server starts only where what the link
names does not undo the recorded release's identity edits
(`service.reload_guard.startup_refusal`): a restart after a hand flip to an older release
would otherwise bring back an erased identity, or release an opted-out one again, on
every pod that restarts. Nor does any facegate command publish over such a hand flip
(`filter.index_release.refuse_if_hand_flipped`): it would record it as published. Reloads
compare with the index serving instead.

A link published before this record existed has none, and startup compares with nothing
there until the next publish writes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filter.errors import FilterError
from filter.index_lineage import RECORD_TIME_FORMAT, changes_undone, lineage_of, utc_stamp


class ReleaseRecordError(FilterError):
    """The record beside a link cannot be read or written."""


@dataclass(frozen=True)
class PublishedRelease:
    fingerprint: str
    release: Path  # the folder, as the record names it from the link's folder
    at: str  # when it was put behind the link (UTC)
    lineage: dict[str, Any]  # what the lineage rule reads of its manifest (`lineage_of`)
    link: Path
    record: Path  # the record itself


@dataclass(frozen=True)
class HandFlip:
    """A link naming an index other than the one facegate last published there, which
    would undo that release's identity edits."""

    published: PublishedRelease
    undone: str  # said for the operator (counts, never names)


def record_path(link: Path) -> Path:
    return Path(link).with_name(f".{Path(link).name}.published")


def record_published(
    link: Path, release: Path, fingerprint: str, manifest: dict[str, Any]
) -> None:
    """Record, atomically, that `release` (index `fingerprint`, `manifest`) is being put
    behind `link`, with the lineage the rule reads of it, so that the release's folder
    need not be read (or be there) to judge what a link names later."""
    link = Path(link)
    path = record_path(link)
    payload = {
        "fingerprint": fingerprint,
        "release": os.path.relpath(Path(release).resolve(), link.parent.resolve()),
        "at": utc_stamp(),
        "lineage": lineage_of(manifest),
    }
    try:
        _write(path, (json.dumps(payload, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise ReleaseRecordError(
            f"the record of the release to publish at {link} could not be written ({path}: "
            f"{exc}); {link} was not flipped. Fix the cause and publish again"
        ) from None


@contextmanager
def recording(
    link: Path, release: Path, fingerprint: str, manifest: dict[str, Any]
) -> Iterator[None]:
    """Record `release` as published at `link` around the flip inside: written before it,
    so that a flip never goes unrecorded (a crash in between leaves the record ahead of
    the link, which fails closed), and put back as it was if the flip fails (unless the
    link names the release all the same: the flip happened, then something failed)."""
    path = record_path(link)
    try:
        before: bytes | None = path.read_bytes()
    except FileNotFoundError:
        before = None
    record_published(link, release, fingerprint, manifest)
    try:
        yield
    except BaseException:
        if os.path.realpath(link) != os.path.realpath(release):
            if before is None:
                path.unlink(missing_ok=True)
            else:
                _write(path, before)
        raise


def _write(path: Path, content: bytes) -> None:
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        with staging.open("wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def last_published(link: Path) -> PublishedRelease | None:
    """The release facegate last put behind `link` (None: no record, a link published
    before the record existed or never published by facegate)."""
    link = Path(link)
    path = record_path(link)
    try:
        recorded = json.loads(path.read_text())
        fingerprint, release, at = recorded["fingerprint"], recorded["release"], recorded["at"]
        lineage = recorded["lineage"]
        if not all(isinstance(v, str) and v for v in (fingerprint, release, at)):
            raise TypeError("fingerprint, release and at must be strings")
        if not isinstance(lineage, dict):
            raise TypeError("lineage must be an object")
        time.strptime(at, RECORD_TIME_FORMAT)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReleaseRecordError(
            f"{path}, the record of the release last published at {link}, cannot be read: "
            f"{exc}. If {link} names the index to serve, remove {path}: the next facegate "
            "command that publishes there writes it again (until then, servers starting "
            "on the link compare it with nothing)"
        ) from None
    return PublishedRelease(fingerprint, link.parent / release, at, lineage, link, path)


def hand_flip(
    published: PublishedRelease | None, manifest: dict[str, Any], fingerprint: str
) -> HandFlip | None:
    """Whether the index a link names (`manifest`, `fingerprint`) would undo identity edits
    of `published`, the release facegate last put there (None: it is that release, one
    made from it, or there is no record). The rule is `changes_undone`'s."""
    if published is None or published.fingerprint == fingerprint:
        return None
    undone = changes_undone(published.lineage, published.fingerprint, manifest, fingerprint)
    return None if undone is None else HandFlip(published, undone)
