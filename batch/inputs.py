"""What a batch run reads: folders (recursively), globs, single files and Parquet files
holding image bytes or paths, listed as `InputItem`s before any image is read (so that a
resumed run can drop the images the manifest already has without touching them)."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import cast

from batch.errors import BatchInputError
from batch.rows import ItemRow
from batch.targets import NameFolding, refuse_taken_places, same_name
from filter.images import IMAGE_SUFFIXES

PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
# Column names looked for in Parquet input, in order of preference. `bytes` and `path` are
# what Ray Data's read_binary_files(include_paths=True) writes.
BYTES_COLUMNS = ("bytes", "image", "data", "content")
PATH_COLUMNS = ("path", "uri", "file", "filename")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputItem:
    """One image to check. `key` is what the manifest records as its path: the file's
    absolute path, or for a Parquet row its Parquet file's resolved path and the row's
    path or URI (`FILE.parquet#path=P`; `FILE.parquet#row=N` when the row has none), so
    that the rows of two Parquet files never share a key. `copy_to` is where a passing
    copy goes, relative to OUT/pass/."""

    key: str
    source: str  # the file (or URI) to read; for Parquet bytes, the Parquet file
    copy_to: str
    row: int = -1  # >= 0: the image bytes are in this row of `source`, column `column`
    column: str = ""
    # A rerun re-checks a file whose bytes changed: the sha256 of the row it replaces
    # ("" when it replaces none, or one whose bytes could not be read).
    supersedes: str = ""

    def as_row(self) -> ItemRow:
        return cast(ItemRow, asdict(self))


def discover_inputs(
    specs: Sequence[str],
    copy_suffix: str | None = None,
    exclude: Path | None = None,
    fold: NameFolding = same_name,
) -> list[InputItem]:
    """Every image named by the specs, in a stable order, each once. `copy_suffix`: the
    suffix every copy gets (".png" for re-encoded copies; None keeps each file's own).
    `exclude`: a resolved folder whose files are not inputs (OUT, inside an input folder).
    `fold`: how OUT's file system compares names (batch.targets.name_folding).
    Raises BatchInputError for a spec that names nothing, a Parquet file without an image
    column, or two inputs whose copies would land on the same path."""
    items: list[InputItem] = []
    for spec in specs:
        found = list(_expand(spec))
        if not found:
            raise BatchInputError(f"{spec}: no images found (folder, glob, image or Parquet file)")
        items.extend(found)
    if exclude is not None:
        folders: dict[str, Path | None] = {}  # resolved once per folder, not per file
        items = [item for item in items if not _inside(item.source, exclude, folders)]
    if copy_suffix is not None:
        items = [replace(item, copy_to=with_suffix(item.copy_to, copy_suffix)) for item in items]
    return _unique(items, fold)


def _inside(source: str, folder: Path, folders: dict[str, Path | None]) -> bool:
    if "://" in source:
        return False
    path = Path(source)
    parent = str(path.parent)
    if parent not in folders:
        try:
            folders[parent] = path.parent.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            folders[parent] = None
    resolved = folders[parent]
    return resolved is not None and (resolved / path.name).is_relative_to(folder)


def with_suffix(copy_to: str, suffix: str) -> str:
    """`gen/a.jpg` -> `gen/a.png`; a name without a suffix gets one."""
    path = PurePosixPath(copy_to)
    return str(path.with_suffix(suffix) if path.suffix else path.with_name(path.name + suffix))


def _expand(spec: str) -> Iterable[InputItem]:
    if _GLOB_CHARS.search(spec):
        root = _glob_root(spec)
        for match in sorted(glob.glob(spec, recursive=True)):
            path = Path(match)
            if path.is_dir():
                yield from _folder(path, root)
            elif path.suffix.lower() in PARQUET_SUFFIXES:
                yield from parquet_items(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                yield _file(path, root)
        return
    path = Path(spec)
    if path.is_dir():
        yield from _folder(path, path)
    elif path.suffix.lower() in PARQUET_SUFFIXES and path.is_file():
        yield from parquet_items(path)
    elif path.exists() or path.is_symlink():
        # Named explicitly: checked whatever its suffix (an unreadable one gets its reject row).
        yield _file(path, path.parent)
    else:
        raise BatchInputError(f"{spec}: no such file or folder")


def _glob_root(pattern: str) -> Path:
    """The folder above the first wildcard: the root that copies keep their paths under."""
    parts: list[str] = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS.search(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _folder(folder: Path, root: Path) -> Iterable[InputItem]:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir():
            yield _file(path, root)


def _file(path: Path, root: Path) -> InputItem:
    absolute = path.absolute()
    root = root.absolute()
    relative = absolute.relative_to(root) if absolute.is_relative_to(root) else absolute.name
    name = root.name or "root"
    return InputItem(key=str(absolute), source=str(absolute), copy_to=f"{name}/{relative}")


def parquet_items(path: Path) -> list[InputItem]:
    """Rows of a Parquet file. With an image-bytes column, each row's bytes are checked
    (the path column, if any, names the row); without one, each row's path is read (a
    relative path is taken from the Parquet file's folder). Only the path column is read
    here: the bytes are read later, and only for rows the manifest does not have yet."""
    import pyarrow as pa

    if not path.is_file():
        # A FIFO named *.parquet (matched by a glob) would block the listing forever.
        raise BatchInputError(f"{path}: a Parquet input must be a regular file")
    try:
        return _parquet_items(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        # A corrupt file fails in pyarrow's decoders with their own errors (ArrowInvalid,
        # a UnicodeDecodeError on a garbled string, ...), which name no file.
        raise BatchInputError(
            f"{path}: not a readable Parquet file: {type(exc).__name__}: {exc}"
        ) from None


def _parquet_items(path: Path) -> list[InputItem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    types = {name: schema.field(name).type for name in schema.names}
    binary = [n for n, t in types.items() if pa.types.is_binary(t) or pa.types.is_large_binary(t)]
    strings = [n for n, t in types.items() if pa.types.is_string(t) or pa.types.is_large_string(t)]
    bytes_column = next((n for n in BYTES_COLUMNS if n in binary), binary[0] if binary else None)
    path_column = next((n for n in PATH_COLUMNS if n in strings), None)
    if bytes_column is None and path_column is None:
        raise BatchInputError(
            f"{path}: no image column: expected a binary column (image bytes) or a string "
            f"column named one of {', '.join(PATH_COLUMNS)} (image paths)"
        )
    absolute = path.absolute()
    named = (
        pq.read_table(absolute, columns=[path_column]).column(0).to_pylist()
        if path_column is not None
        else [None] * pq.ParquetFile(absolute).metadata.num_rows
    )
    stem = absolute.stem
    resolved = path.resolve()
    items: list[InputItem] = []
    for row, name in enumerate(named):
        if bytes_column is not None:
            items.append(
                InputItem(
                    key=f"{resolved}#path={name}" if name else f"{resolved}#row={row}",
                    source=str(absolute),
                    copy_to=f"{stem}/{safe_relative(name) if name else f'row-{row:09d}'}",
                    row=row,
                    column=bytes_column,
                )
            )
        elif name:
            source = name if "://" in name else str(absolute.parent / name)
            items.append(
                InputItem(
                    key=f"{resolved}#path={name}",
                    source=source,
                    copy_to=f"{stem}/{safe_relative(name)}",
                )
            )
        else:
            raise BatchInputError(f"{path}: row {row} has no path")
    return items


def safe_relative(name: str) -> str:
    """A path or URI as a relative path that stays inside its folder: the scheme, any
    leading slash, `.` and `..` are dropped (`s3://b/x/../y.png` -> `b/x/y.png`)."""
    without_scheme = name.split("://", 1)[-1]
    parts = [
        p
        for p in PurePosixPath(without_scheme.replace("\\", "/")).parts
        if p not in ("/", ".", "..")
    ]
    return "/".join(parts) or "unnamed"


def _unique(items: list[InputItem], fold: NameFolding) -> list[InputItem]:
    """Each image once (a file named twice is checked once); two different images that
    would be recorded under one path, or copied onto one path (batch.targets), are
    refused."""
    by_key: dict[str, InputItem] = {}
    out: list[InputItem] = []
    for item in items:
        seen = by_key.get(item.key)
        if seen is not None:
            if (seen.source, seen.row) == (item.source, item.row):
                continue  # the same image named twice (its first name decides the copy)
            raise BatchInputError(f"two inputs are both named {item.key!r}; rename one")
        by_key[item.key] = item
        out.append(item)
    refuse_taken_places(out, fold)
    return out
