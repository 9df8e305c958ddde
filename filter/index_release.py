"""Publishing an index where a live server reads it, so that a reload sees the old index
or the new one, whole, never a folder half written.

The layout that makes this atomic is a symlink: FACEGATE_INDEX_PATH names a link (e.g.
`/index/current`) to a release folder (`/index/releases/<name>`). A new index is written
to a new release folder, verified, and the link is replaced with one rename(2). The
server resolves the link at each reload; old releases stay for a rollback (flip back).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from filter.errors import FilterError
from filter.index import FaissIdentityIndex

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


def publish(index: FaissIdentityIndex, path: Path) -> Path:
    """Write `index` at `path` atomically for readers; returns the folder written.

    A symlink at `path`: the index goes to a new release folder beside the current
    target, then the link flips. A plain folder (or nothing) at `path`: a staging folder
    is renamed over it (readers that resolve the path once, as the server does, see one
    folder or the other)."""
    path = Path(path)
    if not path.is_symlink():
        index.save(path)
        return path
    current = Path(os.path.realpath(path))
    release = current.parent / _release_name(current.name, index.fingerprint)
    index.save(release)
    flip_link(path, release)
    return release


def publish_folder(source: Path, link: Path, name: str | None = None) -> Path:
    """Copy a built index folder into `<link's folder>/releases/`, verify the copy
    (manifest, hashes, self-test), then flip `link` to it. The files are copied as they
    are, so the fingerprint does not change. Returns the release folder."""
    source, link = Path(source), Path(link)
    fingerprint = FaissIdentityIndex.load(source).fingerprint  # refuse a broken source early
    if link.exists() and not link.is_symlink():
        raise FilterError(
            f"{link} is a folder, not a symlink; publish needs a link to flip (move the "
            f"folder into {link.parent / RELEASES_DIR} and link to it)"
        )
    releases = link.parent / RELEASES_DIR
    releases.mkdir(parents=True, exist_ok=True)
    release = releases / _release_name(name or source.resolve().name, fingerprint)
    staging = Path(tempfile.mkdtemp(prefix=f".{release.name}.staging-", dir=releases))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        copied = FaissIdentityIndex.load(staging)
        if copied.fingerprint != fingerprint:
            raise FilterError(f"the copy of {source} differs from the source; not published")
        os.replace(staging, release)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    flip_link(link, release)
    return release
