"""Step 3 of a batch (a CPU task): copy the passed images, then record the rows.

A copy is made from what the read step read and the actors checked (the checked pixels
re-encoded, or the very bytes that were hashed), never re-read from the input: a file
replaced in between would otherwise be released unchecked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from batch.errors import BatchError
from batch.manifest import PASS_DIR, write_fragment
from batch.rows import CheckedRow, RecordedRow


def record_rows(out: Path, rows: Sequence[CheckedRow]) -> list[RecordedRow]:
    """Copy each passed image to OUT/pass/, then write the rows as one manifest fragment
    (in that order: a row is only recorded once its copy exists). Returns the rows as
    recorded, without the image bytes."""
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
            write_atomically(Path(out) / relative, data)
            row["pass_copy"] = relative.as_posix()
            row["pass_sha256"] = hashlib.sha256(data).hexdigest()
        recorded.append(row)
    write_fragment(out, recorded)
    return recorded


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def sniff_suffix(data: bytes) -> str:
    """A file suffix for image bytes that came without a name (Parquet rows)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), ".img")
