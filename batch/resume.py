"""Resume by content: a manifest row is reused only for the same bytes.

Before a rerun reads any image for checking, every input that already has a current row
is fingerprinted on the driver:

- `content` (the default): the sha256 of its bytes now (files, Parquet rows and URIs
  alike), compared with the row's `sha256`;
- `size-mtime`: a file (or, for its rows, a Parquet file) whose size and modification time
  are those recorded is trusted unchanged without being read; otherwise its sha256 decides
  as above. This trusts the filesystem: a file rewritten with the same size inside the
  mtime's resolution (or with its mtime set back) is not seen.

An input whose bytes changed is checked again: its new row supersedes the old one (it
names the old row's sha256 in `supersedes` and is newer), and the old row's copy is
removed before the run, so no copy of bytes that are no longer there stays in OUT/pass/.
Only bytes actually read and found different count as a change: an input that cannot be
read now (moved, on a volume not mounted, an unreachable URI) keeps its row and its copy
(`unavailable`), and so does one that could not be read then either. A file now over the
size limit, or a Parquet value now null, was read far enough to differ from hashed bytes:
changed (its copy goes; its new row says why it cannot be checked). A row the filter
passed but whose copy could not be made (`not_copied`) is checked again.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batch.inputs import InputItem
from batch.reading import parquet_bytes, read_source, source_stat
from batch.recording import NOT_COPIED
from filter.images import ImageLimits

RESUME_CONTENT = "content"
RESUME_SIZE_MTIME = "size-mtime"
RESUME_MODES = (RESUME_CONTENT, RESUME_SIZE_MTIME)
HASH_THREADS = 4  # hashing reads files: threads overlap the I/O (hashlib releases the GIL)
# A digest for bytes read far enough to differ from any hashed row's, without a sha256:
# a file now over the size limit, a Parquet value now null. No sha256 is this string.
DIFFERENT = "different-now"


@dataclass(frozen=True)
class Resumed:
    pending: list[InputItem]  # to check (new, or changed: `supersedes` set)
    skipped: int  # the same bytes as their current row
    changed: int  # had a row, but other bytes now
    removed_copies: list[Path]  # copies of superseded rows, removed
    unavailable: int = 0  # had a row, but cannot be read now: row and copy kept


def resume(
    items: Sequence[InputItem],
    current: dict[str, dict[str, Any]],
    out: Path,
    mode: str = RESUME_CONTENT,
    limits: ImageLimits | None = None,
) -> Resumed:
    """Split `items` into those to check and those whose current row still holds."""
    if mode not in RESUME_MODES:
        raise ValueError(f"resume mode {mode!r} is not one of {', '.join(RESUME_MODES)}")
    limits = limits or ImageLimits()
    known = [item for item in items if item.key in current]
    trusted: set[str] = set()
    if mode == RESUME_SIZE_MTIME:
        trusted = {item.key for item in known if _same_stat(item, current[item.key])}
    to_hash = [item for item in known if item.key not in trusted]
    digests = _digests(to_hash, limits)
    pending: list[InputItem] = []
    removed: list[Path] = []
    skipped = changed = unavailable = 0
    for item in items:
        row = current.get(item.key)
        if row is None:
            pending.append(item)
            continue
        digest = None if item.key in trusted else digests[item.key]
        recorded = row["sha256"]
        # Unreadable then (no sha256) and now, whether missing, over the limit or null.
        same = (
            item.key in trusted or digest == recorded or (recorded is None and digest == DIFFERENT)
        )
        if same and row.get("reason") == NOT_COPIED:
            pending.append(replace(item, supersedes=row["sha256"] or ""))
        elif same:
            skipped += 1
        elif digest is None:
            # Nothing was read, so nothing says the bytes changed: the row and its copy
            # stay until different bytes are read.
            unavailable += 1
        else:
            changed += 1
            pending.append(replace(item, supersedes=row["sha256"] or ""))
            if row["pass_copy"]:
                copy = Path(out) / row["pass_copy"]
                if copy.is_file() or copy.is_symlink():
                    copy.unlink()
                    removed.append(copy)
    return Resumed(pending, skipped, changed, removed, unavailable)


def _same_stat(item: InputItem, row: dict[str, Any]) -> bool:
    try:
        size, mtime = source_stat(item.source)
    except Exception:
        return False
    return (size, mtime) == (row["source_size"], row["source_mtime_ns"]) and mtime is not None


def _digests(items: Sequence[InputItem], limits: ImageLimits) -> dict[str, str | None]:
    """sha256 of each item's bytes now (None: they cannot be read)."""
    out: dict[str, str | None] = {}
    rows = [item for item in items if item.row >= 0]
    by_file: dict[str, list[InputItem]] = defaultdict(list)
    for item in rows:
        by_file[item.source].append(item)
    for members in by_file.values():
        try:
            found = parquet_bytes([m.as_row() for m in members])
        except Exception:  # a corrupt or missing Parquet file: nothing read
            found = {}
        for i, member in enumerate(members):
            if i not in found:
                out[member.key] = None  # the file could not be read
            else:
                data = found[i]
                out[member.key] = DIFFERENT if data is None else hashlib.sha256(data).hexdigest()
    files = [item for item in items if item.row < 0]

    def digest(item: InputItem) -> str | None:
        try:
            return hashlib.sha256(read_source(item.as_row(), limits)).hexdigest()
        except Exception:  # unreadable now, for whatever reason: nothing read
            return DIFFERENT if _over_the_limit(item.source, limits) else None

    workers = min(HASH_THREADS, max(1, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item, value in zip(files, pool.map(digest, files), strict=True):
            out[item.key] = value
    return out


def _over_the_limit(source: str, limits: ImageLimits) -> bool:
    """The file is there and larger than any row's bytes could have been."""
    try:
        size, _ = source_stat(source)
    except Exception:
        return False
    return size > limits.max_bytes
