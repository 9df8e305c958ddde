"""Publishing an index where a live server reads it, so that a reload sees the old index
or the new one, whole, never a folder half written.

The layout that makes this atomic is a symlink: FACEGATE_INDEX_PATH names a link (e.g.
`/index/current`) to a release folder (`/index/releases/<name>`). A new index is written
to a new release folder, verified, and the link is replaced with one rename(2). The
server resolves the link at each reload; old releases stay for a rollback (`index publish
OLDER LINK --discard-live-changes` where edits are undone: servers refuse a hand flip that
undoes them, on reload and, from the record each flip here leaves beside the link
(filter.release_record), on restart).
A plain folder is replaced by an atomic exchange (filter.index_store.swap_in).

Publishing never loosens silently: a release whose thresholds are looser than those of
the index the link points to now is refused unless it carries an acknowledgement covering
that step (given against thresholds no stricter than the live ones), or the
operator gives one for it (`--allow-looser`), which is recorded in its manifest
(filter.index_lineage).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filter.decide import DecisionThresholds
from filter.errors import FilterError
from filter.index import FaissIdentityIndex, manifest_fingerprint
from filter.index_lineage import (
    accept_looser,
    acknowledge_discard,
    acknowledgement,
    changes_undone,
    discard_acknowledged,
)
from filter.index_store import (
    LABELS_FILE,
    MANIFEST_FILE,
    REPLICA_LABELS_FILE,
    swap_in,
    write_json,
)
from filter.release_record import hand_flip, last_published, recording

RELEASES_DIR = "releases"
_RELEASE_SUFFIX = re.compile(r"\.\d{8}T\d{6}Z-[0-9a-f]{8}$")


def _release_name(base: str, fingerprint: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{_RELEASE_SUFFIX.sub('', base)}.{stamp}-{fingerprint[:8]}"


def flip_link(link: Path, release: Path) -> None:
    """Point `link` at `release` with one rename: readers see the old target or the new.
    The link stays relative when it was (or is new), so the tree can be mounted anywhere."""
    link = Path(link)
    relative = not (link.is_symlink() and os.path.isabs(os.readlink(link)))
    target = os.path.relpath(release, link.parent) if relative else str(release)
    staging = link.with_name(f".{link.name}.link-{os.getpid()}")
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    os.symlink(target, staging)
    os.replace(staging, link)


class IndexBusyError(FilterError):
    """Another facegate command is writing the same index."""


class IndexChangedError(FilterError):
    """The index changed between a command's reading it and its writing the result."""


@contextmanager
def editing(path: Path) -> Iterator[None]:
    """Hold the edit lock of the index at `path` (a link or a folder) while a command
    reads it, works and writes the result: two edits of one index (an `index add` while
    `calibrate --save` measures) would each publish what they read, and the later would
    silently drop the earlier's change (an opt-out, an erasure). Not waited on: a second
    command is refused at once, before its work, naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as writing the index would
    lock_path = Path(os.path.realpath(path.parent)) / f".{path.name}.lock"
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            raise IndexBusyError(
                f"another facegate command is writing {path} ({holder or 'unknown'}; lock "
                f"{lock_path}): wait for it to finish, then run this one on its result"
            ) from None
        os.ftruncate(descriptor, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(descriptor, f"pid {os.getpid()} since {stamp}".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock; the file stays (removing it would race)


def fingerprint_at(path: Path) -> str | None:
    """The fingerprint of the index `path` holds now, from its manifest alone (None:
    nothing there)."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.exists():
        return None
    try:
        return manifest_fingerprint(json.loads(manifest.read_text()))
    except (OSError, ValueError):
        return "unreadable"


def publish(index: FaissIdentityIndex, path: Path, read: str | None = None) -> Path:
    """Write `index` at `path` atomically for readers; returns the folder written.

    A symlink at `path`: the index goes to a new release folder beside the current
    target, then the link flips. A plain folder (or nothing) at `path`: a staging folder
    is renamed over it (readers that resolve the path once, as the server does, see one
    folder or the other).

    `read`: the fingerprint of the index at `path` the result was made from; refused
    (IndexChangedError) if `path` holds another index by now, whose change writing this
    result would undo. Call it under `editing(path)`, which keeps other facegate commands
    out; this check also catches a writer that takes no lock (a link flipped by hand)."""
    path = Path(path)
    if path.is_symlink():
        refuse_if_hand_flipped(path)
    if read is not None:
        refuse_if_changed(path, read)  # before the work of writing, and again after it
    if not path.is_symlink():
        if read is None:
            index.save(path)
            return path
        staged = path.parent / f".{path.name}.publish-{os.getpid()}-{time.monotonic_ns()}"
        try:
            index.save(staged)
            refuse_if_changed(path, read)
            swap_in(staged, path)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return path
    current = Path(os.path.realpath(path))
    release = current.parent / _release_name(current.name, index.fingerprint)
    index.save(release)
    if read is not None:
        try:
            refuse_if_changed(path, read)
        except IndexChangedError:
            shutil.rmtree(release, ignore_errors=True)
            raise
    refuse_if_hand_flipped(path)  # again: a writer that takes no lock
    with recording(path, release, index.fingerprint, index.manifest):
        flip_link(path, release)
    return release


class LooserIndexError(FilterError):
    """A release looser than the one it replaces, without an acknowledgement."""


@dataclass(frozen=True)
class Published:
    release: Path
    fingerprint: str
    looser: list[str]  # how it is looser than what the link pointed to ([]: it is not)
    acknowledgement: dict[str, Any] | None  # the release's, when it is looser
    undone: str | None = None  # what of the live index it replaced, with --discard-live-changes


class DivergedIndexError(FilterError):
    """A release not made from the live index, whose changes publishing it would undo."""


def publish_folder(
    source: Path,
    link: Path,
    name: str | None = None,
    allow_looser: bool = False,
    discard_live_changes: bool = False,
) -> Published:
    """Copy a built index folder into `<link's folder>/releases/`, verify the copy
    (manifest, hashes, self-test), then flip `link` to it. The files are copied as they
    are, so the fingerprint does not change, unless an acknowledgement is recorded in the
    copy's manifest (`allow_looser`, `discard_live_changes`). Refuses (LooserIndexError) a
    release looser than the link's current target that carries no acknowledgement, and
    (DivergedIndexError) one that would undo the live index's edits without
    `discard_live_changes`."""
    source, link = Path(source), Path(link)
    built = FaissIdentityIndex.load(source)  # refuse a broken source early
    fingerprint = built.fingerprint
    if link.exists() and not link.is_symlink():
        raise FilterError(
            f"{link} is a folder, not a symlink; publish needs a link to flip (move the "
            f"folder into {link.parent / RELEASES_DIR} and link to it)"
        )
    if link.is_symlink():
        refuse_if_hand_flipped(link)
    live = FaissIdentityIndex.load(link) if link.exists() else None
    undone = None
    if live is not None:
        undone = changes_undone(live.manifest, live.fingerprint, built.manifest, fingerprint)
        if undone is not None and not discard_live_changes:
            raise DivergedIndexError(
                f"{source} was not made from the index {link} holds now ({live.fingerprint}):"
                f" publishing it would undo {undone}. Make it again from {link} (`facegate "
                f"index add|remove {link} ... --out NEW`, then calibrate NEW), or publish "
                "with --discard-live-changes to replace them knowingly (a rollback)"
            )
    looser: list[str] = []
    record: dict[str, Any] | None = None
    if live is not None:

        def refuse(looser: list[str]) -> Exception:
            return LooserIndexError(
                f"{source} is looser than the index {link} points to ({'; '.join(looser)}): "
                "servers watching the link would release faces the current index holds "
                "back. Publish it with --allow-looser to acknowledge that for this release "
                "(recorded in its manifest), or recalibrate"
            )

        # A copy: the release keeps its files (and fingerprint) unless acknowledged now.
        candidate = dict(built.manifest)
        if undone is not None and discard_acknowledged(candidate, live.fingerprint) is None:
            # Servers watching the link accept the rollback only with this record.
            acknowledge_discard(
                candidate,
                by="index publish --discard-live-changes",
                replaces=live.fingerprint,
                undone=undone,
                copy_of=fingerprint,
            )
        looser = accept_looser(
            candidate,
            before=index_thresholds(live),
            after=index_thresholds(built),
            allowed=allow_looser,
            by="index publish --allow-looser",
            replaces=live.fingerprint,
            refuse=refuse,
        )
        record = candidate if candidate != built.manifest else None
    releases = link.parent / RELEASES_DIR
    releases.mkdir(parents=True, exist_ok=True)
    expected = fingerprint if record is None else manifest_fingerprint(record)
    release = _existing_release(releases, expected)  # a rollback: that very release again
    if release is None:
        release = _free_name(releases, _release_name(name or source.resolve().name, expected))
        _copy_verified(source, release, record, expected)
    # The looser check was made against `live`: flip only if the link still points there.
    refuse_if_changed(link, live.fingerprint if live is not None else None)
    with recording(link, release, expected, built.manifest if record is None else record):
        flip_link(link, release)
    ack = None
    if looser:
        ack = acknowledgement(built.manifest if record is None else record)
    return Published(release, expected, looser, ack, undone)


def _existing_release(releases: Path, fingerprint: str) -> Path | None:
    """A release folder already holding this very index (fingerprint), verified."""
    for folder in sorted(releases.glob(f"*-{fingerprint[:8]}*")):
        if folder.name.startswith("."):
            continue
        try:
            if FaissIdentityIndex.load(folder).fingerprint == fingerprint:
                return folder
        except FilterError:
            continue
    return None


def _free_name(releases: Path, name: str) -> Path:
    release, number = releases / name, 2
    while release.exists():
        release, number = releases / f"{name}-{number}", number + 1
    return release


def _copy_verified(
    source: Path, release: Path, manifest: dict[str, Any] | None, expected: str
) -> None:
    """Copy the index files to a staging folder, write `manifest` if given, load the copy
    (manifest, hashes, self-test) and rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{release.name}.staging-", dir=release.parent))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        if manifest is not None:
            write_json(staging / MANIFEST_FILE, manifest)
        if FaissIdentityIndex.load(staging).fingerprint != expected:
            raise FilterError(f"the copy of {source} differs from the source; not published")
        os.replace(staging, release)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def refuse_if_hand_flipped(link: Path) -> None:
    """Refuse (DivergedIndexError) to publish over a link flipped by another hand than
    facegate's to an index that would undo the edits of the release facegate last put
    there: the new release would be recorded as published over it, and servers would
    then start on what the hand flip undid."""
    current = Path(os.path.realpath(link)) / MANIFEST_FILE
    try:
        manifest = json.loads(current.read_text())
    except (OSError, ValueError):
        return  # nothing readable there: loading it says why
    if not isinstance(manifest, dict):
        return
    flip = hand_flip(last_published(link), manifest, manifest_fingerprint(manifest))
    if flip is not None:
        raise DivergedIndexError(
            f"{link} names index {manifest_fingerprint(manifest)}, not "
            f"{flip.published.fingerprint}, which facegate published there last "
            f"({flip.published.release}): it was flipped by another hand (or a facegate "
            f"command stopped between recording that release and flipping the link), and "
            f"serving it undoes {flip.undone}. Point {link} at {flip.published.release} "
            f"first (then, for a rollback, `facegate index publish OLDER {link} "
            "--discard-live-changes`)"
        )


def refuse_if_changed(path: Path, read: str | None) -> None:
    """`read`: the fingerprint of what `path` held when the command read it (None:
    nothing)."""
    now = fingerprint_at(path)
    if now != read:
        raise IndexChangedError(
            f"{path} changed while this command worked (it read {read or 'nothing'}, the "
            f"path now holds {now or 'nothing'}): nothing was written, so that change stays. "
            "Rerun the command on the index as it is now"
        )


def index_thresholds(index: FaissIdentityIndex) -> DecisionThresholds:
    """The thresholds a server with no override would apply to this index."""
    from filter.thresholds import resolve_thresholds

    return resolve_thresholds(index).decision


def releases_holding(
    folders: list[Path], identities: list[str], exclude: Path | None = None, only: bool = False
) -> list[Path]:
    """The index folders among `folders` and, unless `only`, the releases beside them,
    whose face or replica rows name any of `identities`: copies that still hold a removed
    person's vectors."""
    wanted = set(identities)
    candidates: set[Path] = set()
    for folder in folders:
        candidates.add(folder.resolve())
        if not only:
            candidates |= {
                sibling.resolve()
                for sibling in folder.resolve().parent.iterdir()
                if sibling.is_dir() and (sibling / MANIFEST_FILE).is_file()
            }
    if exclude is not None:
        candidates.discard(exclude.resolve())
    return [folder for folder in sorted(candidates) if _holds(folder, wanted)]


def _holds(folder: Path, identities: set[str]) -> bool:
    for labels in (LABELS_FILE, REPLICA_LABELS_FILE):
        try:
            rows = json.loads((folder / labels).read_text())
        except (OSError, ValueError):
            continue
        if any(isinstance(row, dict) and row.get("identity") in identities for row in rows):
            return True
    return False
