"""Step 3 of a batch (a CPU task): copy the passed images, then record the rows.

A copy is made from what the read step read and the actors checked (the checked pixels
re-encoded, or the very bytes that were hashed), never re-read from the input: a file
replaced in between would otherwise be released unchecked.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from batch.errors import BatchError
from batch.manifest import PASS_DIR, write_fragment
from batch.rows import CheckedRow, RecordedRow
from batch.targets import sniff_suffix

__all__ = ["NOT_COPIED", "record_rows", "sniff_suffix", "write_atomically"]

# The reason of a row the filter passed but whose copy could not be made (a name the
# filesystem refuses, a path another input's copy holds): rejected, since nothing can be
# handed on, and checked again by a rerun (batch.resume), which may then be able to copy.
NOT_COPIED = "not_copied"


def record_rows(out: Path, rows: Sequence[CheckedRow]) -> list[RecordedRow]:
    """Copy each passed image to OUT/pass/, then write the rows as one manifest fragment
    (in that order: a row is only recorded once its copy exists). A copy that cannot be
    made turns its row into a `not_copied` rejection, and the others go on. Returns the
    rows as recorded, without the image bytes."""
    recorded: list[RecordedRow] = []
    now = datetime.now(UTC)
    for checked in rows:
        fields = {k: v for k, v in checked.items() if k not in ("copy", "copy_to")}
        row = cast(RecordedRow, {**fields, "pass_copy": None, "pass_sha256": None})
        row["recorded_at"] = now
        data, copy_to = checked.get("copy"), checked.get("copy_to")
        if row["verdict"] == "pass":
            if data is None or copy_to is None:
                raise BatchError(f"{row['path']}: a passed row without its bytes")
            relative = Path(PASS_DIR) / copy_to
            if not relative.suffix:
                relative = relative.with_suffix(sniff_suffix(data))
            try:
                _copy(Path(out) / relative, data)
            except Exception as exc:
                row["verdict"], row["reason"] = "reject", NOT_COPIED
                row["error"] = (
                    f"passed, but its copy could not be written to {relative.as_posix()}: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                )
                row["part"] = None
            else:
                row["pass_copy"] = relative.as_posix()
                row["pass_sha256"] = hashlib.sha256(data).hexdigest()
        recorded.append(row)
    write_fragment(out, recorded)
    return recorded


def _copy(path: Path, data: bytes) -> None:
    """Write a copy where no other input's copy is: the plan refuses inputs whose copies
    would share a path, but a file there now (another run's copy, say) is never replaced
    by different bytes. The same bytes are the copy already (a retried task)."""
    if path.is_file():
        if path.read_bytes() != data:
            raise FileExistsError(f"{path.name} already holds another input's copy")
        return
    write_atomically(path, data)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short name: `.{name}.tmp` is longer than the longest name the filesystem allows
    # when the copy's own name is close to it. A crashed write's leftover is removed by
    # the next run (batch.manifest.remove_unrecorded_copies).
    partial = path.with_name(f".fg-{secrets.token_hex(8)}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
