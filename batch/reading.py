"""Step 1 of a batch (a CPU task): read each image's bytes, hash them, and read every
image they can show (`filter.content`); prepare the copy a pass will get. Light imports
only: every Ray worker that runs it imports this module."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from batch.rows import ItemRow, LoadedRow
from filter.content import checked_pixels_png, read_content
from filter.errors import ImageError
from filter.images import ImageLimits


def source_stat(source: str) -> tuple[int, int | None]:
    """Size and modification time (ns) of a file or URI, as resume's fast mode records
    and compares them (None: the filesystem gives no time)."""
    if "://" in source:
        import pyarrow.fs

        filesystem, location = pyarrow.fs.FileSystem.from_uri(source)
        info = filesystem.get_file_info(location)
        if info.size is None:
            raise OSError(f"{source}: no such file")
        return int(info.size), None if info.mtime_ns is None else int(info.mtime_ns)
    found = os.stat(source)
    return found.st_size, found.st_mtime_ns


def read_source(item: ItemRow, limits: ImageLimits) -> bytes:
    """The bytes of one file or URI (Parquet rows are read by `parquet_bytes`). Only a
    regular file is read: opening a FIFO would wait for a writer for ever, and a device
    never ends."""
    source = str(item["source"])
    if "\x00" in source:
        raise ImageError("the path holds a NUL byte, which no file name can")
    if "://" in source:
        import pyarrow.fs

        filesystem, location = pyarrow.fs.FileSystem.from_uri(source)
        with filesystem.open_input_stream(location) as stream:
            data = bytes(stream.read(limits.max_bytes + 1))
    else:
        # Non-blocking, so that a FIFO opens at once; then refused as no regular file.
        descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(descriptor, "rb") as handle:
            found = os.fstat(handle.fileno())
            if not stat.S_ISREG(found.st_mode):
                raise ImageError("not a regular file (a FIFO, socket, device or folder)")
            size = found.st_size
            if size > limits.max_bytes:
                raise ImageError(f"file is {size} bytes, over the limit of {limits.max_bytes}")
            data = handle.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is over the limit of {limits.max_bytes} bytes")
    return data


def parquet_bytes(items: Sequence[ItemRow]) -> dict[int, bytes | None]:
    """Bytes of Parquet rows, reading only the row groups that hold them (by item index)."""
    import pyarrow.parquet as pq

    out: dict[int, bytes | None] = {}
    by_file: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if int(item["row"]) >= 0:
            by_file[(str(item["source"]), str(item["column"]))].append(i)
    for (source, column), members in by_file.items():
        parquet = pq.ParquetFile(source)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

        def group_of(row: int, starts: np.ndarray = starts) -> int:
            return int(np.searchsorted(starts, row, side="right")) - 1

        groups = sorted({group_of(int(items[i]["row"])) for i in members})
        values = parquet.read_row_groups(groups, columns=[column]).column(0)
        offsets: dict[int, int] = {}
        for group in groups:  # where each group's rows start in `values`
            offsets[group] = sum(sizes[g] for g in offsets)
        for i in members:
            row = int(items[i]["row"])
            group = group_of(row)
            value = values[offsets[group] + row - int(starts[group])].as_py()
            out[i] = None if value is None else bytes(value)
    return out


def load_rows(
    items: Sequence[ItemRow], limits: ImageLimits | None = None, copy_original: bool = False
) -> list[LoadedRow]:
    """Read, hash and read the content of each item; a problem becomes that row's `error`
    (it will get an `unreadable` reject row) and the others go on.

    `copy` is what a pass will be copied as: the checked pixels re-encoded as PNG, or with
    `copy_original` the bytes as they are. Only a file accounted for completely gets one
    (the others are rejected as `unchecked_content` anyway)."""
    limits = limits or ImageLimits()
    try:
        from_parquet = parquet_bytes(items)
        parquet_error = None
    except Exception as exc:  # a corrupt Parquet file: pyarrow raises all sorts
        from_parquet, parquet_error = {}, f"cannot read the Parquet file: {_described(exc)}"
    return [
        _load_row(i, item, from_parquet, parquet_error, limits, copy_original)
        for i, item in enumerate(items)
    ]


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _load_row(
    i: int,
    item: ItemRow,
    from_parquet: dict[int, bytes | None],
    parquet_error: str | None,
    limits: ImageLimits,
    copy_original: bool,
) -> LoadedRow:
    row: LoadedRow = {
        **item,
        "sha256": None,
        "source_size": None,
        "source_mtime_ns": None,
        "view_names": [],
        "view_pixels": [],
        "view_heights": [],
        "view_widths": [],
        "frames": 0,
        "unaccounted": [],
        "copy": None,
        "error": None,
    }
    # Unknown when it cannot be taken: resume's fast mode then reads the bytes.
    with contextlib.suppress(Exception):
        row["source_size"], row["source_mtime_ns"] = source_stat(str(item["source"]))
    try:
        if int(item["row"]) >= 0:
            if parquet_error is not None:
                raise ImageError(parquet_error)
            data = from_parquet.get(i)
            if data is None:
                raise ImageError("the Parquet row holds no image bytes")
        else:
            data = read_source(item, limits)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        content = read_content(data, limits)
        row["view_names"] = [view.name for view in content.views]
        row["view_pixels"] = [view.pixels.tobytes() for view in content.views]
        row["view_heights"] = [int(view.pixels.shape[0]) for view in content.views]
        row["view_widths"] = [int(view.pixels.shape[1]) for view in content.views]
        row["frames"] = content.frames
        row["unaccounted"] = list(content.unaccounted)
        if content.complete:
            row["copy"] = data if copy_original else checked_pixels_png(content)
    except ImageError as exc:
        row["error"] = str(exc)
    except OSError as exc:
        row["error"] = f"cannot read file: {exc.strerror or exc}"
    except Exception as exc:
        # Whatever one file makes a decoder or encoder raise is that file's problem:
        # it gets its `unreadable` row and the batch goes on (a task that raised would
        # stop the whole dataset, and its rerun would stop at the same file).
        row["error"] = f"cannot read the image: {_described(exc)}"
    if row["error"] is not None:
        # An error row carries no image and no copy (its hash stays: resume keeps it).
        row["view_names"], row["view_pixels"] = [], []
        row["view_heights"], row["view_widths"] = [], []
        row["frames"], row["unaccounted"], row["copy"] = 0, [], None
    return row
