"""The three steps of a batch, as plain functions over lists of row dicts (Ray runs them,
tests call them directly):

1. `load_rows` (CPU task): read each image's bytes, hash them, decode them to pixels;
2. `BatchChecker` (model actor): the identity filter, exactly as `facegate check` runs it;
3. `record_rows` (CPU task): copy the passed images, then write the manifest fragment.

The copy is written from the very bytes that were hashed and checked, never re-read from
the input (a file replaced in between would otherwise be released unchecked).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batch.manifest import PASS_DIR, RunIdentity, write_fragment
from filter.decide import ImageVerdict, NoFacePolicy, Reason, unreadable_verdict
from filter.errors import FilterError, ImageError
from filter.images import ImageLimits, decode_image
from filter.runtime import EmbeddingSpec

Row = dict[str, Any]


@dataclass(frozen=True)
class FilterSpec:
    """Everything an actor needs to build the filter `facegate check` would build:
    picklable names, paths and numbers (the overrides as given; None: the index's saved
    calibration, else the defaults, resolved by `filter.runtime.resolve_thresholds`)."""

    embedding: EmbeddingSpec
    index_path: Path
    threshold: float | None = None
    replica_threshold: float | None = None
    no_face_policy: str = NoFacePolicy.REJECT.value

    def run_identity(self) -> tuple[RunIdentity, str]:
        """The index fingerprint and thresholds in force (and their description), from the
        index alone: the driver knows them before any model or actor starts."""
        from filter.index import FaissIdentityIndex
        from filter.runtime import resolve_thresholds

        index = FaissIdentityIndex.load(self.index_path)
        thresholds = resolve_thresholds(index, self.threshold, self.replica_threshold)
        run = RunIdentity(index.fingerprint, thresholds.identity, thresholds.replica)
        return run, thresholds.describe()


def read_source(item: Row, limits: ImageLimits) -> bytes:
    """The bytes of one file or URI (Parquet rows are read by `_parquet_bytes`)."""
    source = str(item["source"])
    if "://" in source:
        import pyarrow.fs

        filesystem, location = pyarrow.fs.FileSystem.from_uri(source)
        with filesystem.open_input_stream(location) as stream:
            data = bytes(stream.read(limits.max_bytes + 1))
    else:
        path = Path(source)
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"file is {size} bytes, over the limit of {limits.max_bytes}")
        data = path.read_bytes()
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is over the limit of {limits.max_bytes} bytes")
    return data


def _parquet_bytes(items: Sequence[Row]) -> dict[int, bytes | None]:
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


def load_rows(items: Sequence[Row], limits: ImageLimits | None = None) -> list[Row]:
    """Read, hash and decode each item; a problem becomes that row's `error` (it will get
    an `unreadable` reject row) and the others go on."""
    limits = limits or ImageLimits()
    try:
        from_parquet = _parquet_bytes(items)
        parquet_error = None
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        from_parquet, parquet_error = {}, f"cannot read the Parquet file: {exc}"
    out: list[Row] = []
    for i, item in enumerate(items):
        row: Row = {**item, "data": None, "sha256": None, "pixels": None, "height": 0, "width": 0}
        row["error"] = None
        try:
            if int(item["row"]) >= 0:
                if parquet_error is not None:
                    raise ImageError(parquet_error)
                data = from_parquet.get(i)
                if data is None:
                    raise ImageError("the Parquet row holds no image bytes")
            else:
                data = read_source(item, limits)
            row["data"] = data
            row["sha256"] = hashlib.sha256(data).hexdigest()
            image = decode_image(data, limits)
            row["pixels"] = image.tobytes()
            row["height"], row["width"] = int(image.shape[0]), int(image.shape[1])
        except ImageError as exc:
            row["error"] = str(exc)
        except OSError as exc:
            row["error"] = f"cannot read file: {exc.strerror or exc}"
        out.append(row)
    return out


def verdict_columns(verdict: ImageVerdict, error: str | None, shape: tuple[int, int] | None) -> Row:
    """The manifest's verdict columns, as `facegate check` reports them (unrounded)."""
    if error is None and verdict.detail is not None:
        error = verdict.detail
    if verdict.reason is Reason.UNSUPPORTED_GEOMETRY and shape is not None:
        error = f"a {shape[1]}x{shape[0]} image is too thin to search for faces"
    return {
        "verdict": verdict.verdict,
        "reason": None if verdict.reason is None else str(verdict.reason),
        "faces": verdict.faces,
        "max_similarity": _finite(verdict.max_similarity),
        "identity": verdict.identity,
        "replica_similarity": _finite(verdict.replica_similarity),
        "error": error,
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)


class BatchChecker:
    """The model side of a batch: the embedding pipeline, the index and the thresholds
    that `facegate check` would use for the same options (one per actor)."""

    def __init__(self, spec: FilterSpec, expected: RunIdentity) -> None:
        from filter.identity_filter import IdentityFilter
        from filter.runtime import load_index_for, resolve_thresholds

        pipeline = spec.embedding.build()
        index = load_index_for(pipeline, spec.index_path)
        thresholds = resolve_thresholds(index, spec.threshold, spec.replica_threshold)
        self.run = RunIdentity(index.fingerprint, thresholds.identity, thresholds.replica)
        if self.run != expected:
            # The index was replaced between the driver's look and this actor's load.
            raise FilterError(f"the index at {spec.index_path} changed during the run")
        self.filter = IdentityFilter(
            pipeline, index, thresholds.decision, NoFacePolicy(spec.no_face_policy)
        )

    def check(self, rows: Sequence[Row]) -> list[Row]:
        readable = [i for i, row in enumerate(rows) if row["error"] is None]
        images = [
            np.frombuffer(rows[i]["pixels"], np.uint8).reshape(
                rows[i]["height"], rows[i]["width"], 3
            )
            for i in readable
        ]
        verdicts = dict(zip(readable, self.filter.check(images), strict=True))
        out: list[Row] = []
        for i, row in enumerate(rows):
            verdict = verdicts.get(i) or unreadable_verdict()
            shape = (row["height"], row["width"]) if i in verdicts else None
            out.append(
                {
                    "path": row["key"],
                    "sha256": row["sha256"],
                    "copy_to": row["copy_to"],
                    "data": row["data"] if verdict.passed else None,
                    **verdict_columns(verdict, row["error"], shape),
                    **self.run.columns(),
                }
            )
        return out


def record_rows(out: Path, rows: Sequence[Row]) -> list[Row]:
    """Copy each passed image to OUT/pass/, then write the rows as one manifest fragment
    (in that order: a row is only recorded once its copy exists). Returns the rows as
    recorded, without the image bytes."""
    recorded: list[Row] = []
    for row in rows:
        row = dict(row)
        data = row.pop("data", None)
        copy_to = row.pop("copy_to", None)
        row["pass_copy"] = None
        if row["verdict"] == "pass":
            if data is None or copy_to is None:
                raise FilterError(f"{row['path']}: a passed row without its bytes")
            relative = Path(PASS_DIR) / copy_to
            if not relative.suffix:
                relative = relative.with_suffix(sniff_suffix(data))
            write_atomically(Path(out) / relative, data)
            row["pass_copy"] = relative.as_posix()
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
