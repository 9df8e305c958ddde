"""The batch manifest: OUT/manifest/part-*.parquet, one row per checked version of each
input image, written one fragment per block (atomically: a crash loses only the blocks in
flight), and read back before a run so that images whose bytes were already checked are
not checked again (`batch.resume`).

A path can have several rows: a rerun that finds a file's bytes changed checks them again
and records a new row, which names the sha256 of the row it replaces (`supersedes`). The
current row of a path is its newest (`recorded_at`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import ManifestError
from filter.decide import NoFacePolicy
from filter.thresholds import FilterInForce

MANIFEST_DIR = "manifest"
PASS_DIR = "pass"
FRAGMENT_GLOB = "part-*.parquet"

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # absolute path; FILE.parquet#path=P or #row=N for a Parquet row
        ("sha256", pa.string()),  # of the bytes checked; null when they could not be read
        ("verdict", pa.string()),  # pass | reject
        ("reason", pa.string()),  # null when passed; else filter.decide.Reason
        ("faces", pa.int32()),  # of the image that decided (the first image for a pass)
        ("max_similarity", pa.float64()),  # best face's similarity; null: no trusted face
        ("identity", pa.string()),  # the matched training identity when a signal fired
        ("replica_similarity", pa.float64()),
        ("error", pa.string()),  # why a file was unreadable, unchecked or rejected
        ("images", pa.int32()),  # images of the file checked: frames, pages, thumbnails
        ("part", pa.string()),  # which of them decided a rejection ("frame 2", ...)
        ("pass_copy", pa.string()),  # the copy, relative to OUT (passed images only)
        ("pass_sha256", pa.string()),  # of the copy's bytes
        ("source_size", pa.int64()),  # of the file (the Parquet file for its rows) when read
        ("source_mtime_ns", pa.int64()),  # null for URIs whose filesystem gives none
        ("recorded_at", pa.timestamp("us", tz="UTC")),
        ("supersedes", pa.string()),  # sha256 of the row this one replaces (same path)
        ("index_fingerprint", pa.string()),
        ("identity_threshold", pa.float64()),
        ("replica_threshold", pa.float64()),  # null: the index has no replica features
        ("copy_mode", pa.string()),  # pixels (re-encoded checked pixels) | original
        ("no_face_policy", pa.string()),  # reject | pass: what an image without a face got
    ]
)
COPY_PIXELS = "pixels"
COPY_ORIGINAL = "original"


@dataclass(frozen=True)
class ManifestRun:
    """What the verdicts depend on besides the image: the filter that judged them
    (`filter.thresholds.FilterInForce`, as the service signs it) and what a copy holds.
    Recorded on every row, and the same for every row of one manifest (a resumed run must
    not mix two indexes' verdicts, nor two kinds of copy in one OUT, nor passes of images
    without a face made under `--no-face-policy pass` with a run that rejects them)."""

    judged_by: FilterInForce
    copy_mode: str = COPY_PIXELS
    no_face_policy: str = NoFacePolicy.REJECT.value

    @property
    def index_fingerprint(self) -> str:
        return self.judged_by.index_fingerprint

    def columns(self) -> RunColumns:
        thresholds = self.judged_by.thresholds
        return {
            "index_fingerprint": self.judged_by.index_fingerprint,
            "identity_threshold": thresholds.identity,
            "replica_threshold": thresholds.replica,
            "copy_mode": self.copy_mode,
            "no_face_policy": self.no_face_policy,
        }


class RunColumns(TypedDict):
    index_fingerprint: str
    identity_threshold: float
    replica_threshold: float | None  # None: the index has no replica features
    copy_mode: str
    no_face_policy: str


def manifest_dir(out: Path) -> Path:
    return Path(out) / MANIFEST_DIR


def fragments(out: Path) -> list[Path]:
    return sorted(manifest_dir(out).glob(FRAGMENT_GLOB))


def read_manifest(out: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Every recorded row (or some columns of them); an empty table when there is none."""
    parts = fragments(out)
    if not parts:
        return MANIFEST_SCHEMA.empty_table().select(list(columns or MANIFEST_SCHEMA.names))
    try:
        for part in parts:
            missing = set(MANIFEST_SCHEMA.names) - set(pq.read_schema(part).names)
            if missing:
                raise ManifestError(
                    f"{part} was written by an earlier facegate (no {', '.join(sorted(missing))}"
                    "): its verdicts and copies were made under rules this run cannot "
                    "confirm. Write to a new --out"
                )
        tables = [pq.read_table(part, columns=columns) for part in parts]
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(
            f"{manifest_dir(out)}: a manifest fragment is unreadable: {exc}"
        ) from None
    return pa.concat_tables(tables)


def check_run_identity(out: Path, run: ManifestRun) -> None:
    """Refuse a manifest made with another index, other thresholds, another kind of copy
    or another no-face policy: its passes were decided (or copied) by rules this run does
    not apply."""
    expected = run.columns()
    table = read_manifest(out, list(expected))
    for row in table.group_by(list(expected)).aggregate([]).to_pylist():
        if row != expected:
            raise ManifestError(
                f"{out} holds verdicts made with index {row['index_fingerprint']}, "
                f"thresholds {row['identity_threshold']}/{row['replica_threshold']}, "
                f"{row['copy_mode']} copies and no-face policy {row['no_face_policy']}; this "
                f"run uses {expected['index_fingerprint']}, "
                f"{expected['identity_threshold']}/{expected['replica_threshold']}, "
                f"{expected['copy_mode']} copies and no-face policy "
                f"{expected['no_face_policy']}: write to a new --out"
            )


# A key an earlier facegate gave a Parquet row: its path or URI alone, not tied to its
# Parquet file (every key is now an absolute local path: a file's, or FILE.parquet#...).
_UNQUALIFIED_KEY = r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|[^/])"


def current_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Each recorded path's current row: its newest (`recorded_at`). Refuses a manifest
    whose Parquet rows are keyed by their path alone (an earlier facegate): the rows of
    two Parquet files that name their images alike would take each other's place."""
    import pyarrow.compute as pc

    table = read_manifest(
        out,
        ["path", "sha256", "reason", "source_size", "source_mtime_ns", "pass_copy", "recorded_at"],
    )
    unqualified = table.filter(pc.match_substring_regex(table.column("path"), _UNQUALIFIED_KEY))
    if unqualified.num_rows:
        raise ManifestError(
            f"{manifest_dir(out)} records Parquet rows by their path alone "
            f"({unqualified.column('path')[0].as_py()!r}), as an earlier facegate did: rows "
            "of two Parquet files could take each other's place. Write to a new --out"
        )
    current: dict[str, dict[str, Any]] = {}
    for row in table.sort_by("recorded_at").to_pylist():
        current[row["path"]] = row
    return current


def remove_partial_fragments(out: Path) -> None:
    """Fragments a crashed run left half-written (never renamed into place)."""
    for partial in manifest_dir(out).glob(".part-*.tmp"):
        partial.unlink(missing_ok=True)


def check_out_folder(out: Path) -> None:
    """Refuse an OUT that is a file, or a folder holding files of something else: a run
    removes what under OUT/pass/ its manifest does not name, which must never be
    somebody's files. A new folder, an empty one or a batch's OUT is fine."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ManifestError(f"--out {out} is a file; name a folder (new, or a batch's OUT)")
    if manifest_dir(out).is_dir() or not any(out.iterdir()):
        return
    raise ManifestError(
        f"--out {out} holds files and is not a batch's OUT (no {MANIFEST_DIR}/): a run "
        f"replaces what its {PASS_DIR}/ holds; name a new folder"
    )


def remove_unrecorded_copies(out: Path) -> int:
    """Files under OUT/pass/ that no current manifest row names: copies (or half-written
    copies) of a batch that crashed before its fragment was written, or of bytes a later
    row superseded. They passed under rules the
    manifest does not vouch for (a rerun may use another index), so they go; the rerun
    checks those images again. Returns how many were removed."""
    pass_dir = Path(out) / PASS_DIR
    if not pass_dir.is_dir():
        return 0
    named = {
        Path(out) / row["pass_copy"]
        for row in current_rows(out).values()
        if row["pass_copy"] is not None
    }
    removed = 0
    for path in pass_dir.rglob("*"):
        if (path.is_file() or path.is_symlink()) and path not in named:
            path.unlink()
            removed += 1
    return removed


def write_fragment(out: Path, rows: Iterable[Mapping[str, object]]) -> Path | None:
    """Write rows as one new fragment: a temporary file renamed into place, so a reader
    (or a resumed run) sees the whole fragment or none of it."""
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in rows],
        schema=MANIFEST_SCHEMA,
    )
    if table.num_rows == 0:
        return None
    folder = manifest_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex}.parquet"
    partial = folder / f".{name}.tmp"
    with partial.open("wb") as sink:
        pq.write_table(table, sink)
        sink.flush()
        os.fsync(sink.fileno())
    final = folder / name
    os.replace(partial, final)
    return final
