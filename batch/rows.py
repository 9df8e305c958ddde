"""The rows a batch passes between its steps (Ray Data carries them as Arrow tables, the
plain functions as dicts): what each step reads and adds, in one place. The Arrow
schemas that match them are `batch.engine.LOADED_SCHEMA`, `CHECKED_SCHEMA` and
`batch.manifest.MANIFEST_SCHEMA`."""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from batch.manifest import RunColumns
from filter.file_check import VerdictRow


class ItemRow(TypedDict):
    """One input (`batch.inputs.InputItem.as_row`)."""

    key: str
    source: str
    copy_to: str
    row: int
    column: str
    supersedes: str


class LoadedRow(ItemRow):
    """An input read (`batch.reading.load_rows`): its bytes' hash, the pixels of every
    image it can show, and what a pass would copy; `error` when it could not be read."""

    sha256: str | None
    source_size: int | None
    source_mtime_ns: int | None
    view_names: list[str]
    view_pixels: list[bytes]
    view_heights: list[int]
    view_widths: list[int]
    frames: int
    unaccounted: list[str]
    copy: bytes | None
    error: str | None


class CheckedRow(VerdictRow, RunColumns):
    """An input judged (`batch.checking.BatchChecker.check`): its verdict, what judged
    it, and the copy to make if it passed."""

    path: str
    sha256: str | None
    copy_to: str
    copy: bytes | None
    source_size: int | None
    source_mtime_ns: int | None
    supersedes: str | None


class RecordedRow(VerdictRow, RunColumns):
    """A manifest row (`batch.recording.record_rows`): the checked row without the bytes,
    with the copy made and when."""

    path: str
    sha256: str | None
    source_size: int | None
    source_mtime_ns: int | None
    supersedes: str | None
    pass_copy: str | None
    pass_sha256: str | None
    recorded_at: datetime
