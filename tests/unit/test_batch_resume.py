"""Issue 19, point 4: a rerun reuses a manifest row only for the same bytes. On main a
file replaced after its row was written was skipped, its row still saying `pass`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.inputs import InputItem, discover_inputs
from batch.manifest import ManifestRun, current_rows, read_manifest, remove_unrecorded_copies
from batch.recording import record_rows
from batch.resume import RESUME_SIZE_MTIME, resume
from filter.thresholds import FilterInForce, Thresholds

RUN = ManifestRun(FilterInForce("fingerprint1", Thresholds(0.4, "override", None, None)))
PNG = b"\x89PNG\r\n\x1a\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_unreadable(out: Path, item: InputItem) -> None:
    """The row of an input that could not be read (no sha256, no copy)."""
    row = {"path": item.key, "sha256": None, "verdict": "reject", "reason": "unreadable"}
    record_rows(out, [{**row, "faces": 0, "copy_to": item.copy_to, **RUN.columns()}])


def _record(out: Path, key: str, copy_to: str, data: bytes, verdict: str = "pass") -> None:
    stat = os.stat(key) if os.path.exists(key) else None
    record_rows(
        out,
        [
            {
                "path": key,
                "sha256": _sha(data),
                "verdict": verdict,
                "reason": None if verdict == "pass" else "identity_match",
                "faces": 1,
                "images": 1,
                "copy_to": copy_to,
                "copy": PNG + data if verdict == "pass" else None,
                "source_size": None if stat is None else stat.st_size,
                "source_mtime_ns": None if stat is None else stat.st_mtime_ns,
                **RUN.columns(),
            }
        ],
    )


def _folder(root: Path) -> tuple[Path, Path]:
    root.mkdir()
    (root / "same.png").write_bytes(PNG + b"same")
    (root / "changed.png").write_bytes(PNG + b"before")
    return root / "same.png", root / "changed.png"


def test_a_replaced_file_is_checked_again_and_its_old_copy_removed(tmp_path: Path) -> None:
    same, changed = _folder(tmp_path / "gen")
    out = tmp_path / "out"
    items = discover_inputs([str(tmp_path / "gen")], ".png")
    by_key = {i.key: i for i in items}
    _record(out, str(same), by_key[str(same)].copy_to, same.read_bytes())
    _record(out, str(changed), by_key[str(changed)].copy_to, changed.read_bytes())
    old_copy = out / "pass" / "gen" / "changed.png"
    assert old_copy.is_file()

    changed.write_bytes(PNG + b"after!")  # replaced after its row was written
    resumed = resume(items, current_rows(out), out)
    assert resumed.skipped == 1 and resumed.changed == 1
    (pending,) = resumed.pending
    assert pending.key == str(changed)
    assert pending.supersedes == _sha(PNG + b"before")  # the row it replaces
    assert not old_copy.exists() and resumed.removed_copies == [old_copy]
    assert (out / "pass" / "gen" / "same.png").is_file()


def test_the_newest_row_is_current_and_older_copies_are_not_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _record(out, "/in/a.png", "in/a.png", b"first")
    _record(out, "/in/a.png", "in/a.png", b"second", verdict="reject")
    rows = read_manifest(out).to_pylist()
    assert len(rows) == 2
    current = current_rows(out)
    assert current["/in/a.png"]["sha256"] == _sha(b"second")
    # The first row's copy is named only by a superseded row: it does not stay.
    assert remove_unrecorded_copies(out) == 1
    assert not (out / "pass" / "in" / "a.png").exists()


def test_size_and_mtime_mode_trusts_the_filesystem(tmp_path: Path) -> None:
    _same, changed = _folder(tmp_path / "gen")
    out = tmp_path / "out"
    items = discover_inputs([str(tmp_path / "gen")], ".png")
    for item in items:
        _record(out, item.key, item.copy_to, Path(item.key).read_bytes())
    stat = changed.stat()
    changed.write_bytes(PNG + b"AFTER!")  # same size
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    fast = resume(items, current_rows(out), out, RESUME_SIZE_MTIME)
    assert fast.skipped == 2 and fast.pending == []  # what "trusting the filesystem" means
    assert len(resume(items, current_rows(out), out).pending) == 1  # content sees it
    changed.write_bytes(PNG + b"longer now")  # another size: the fast mode hashes it
    assert [i.key for i in resume(items, current_rows(out), out, RESUME_SIZE_MTIME).pending] == [
        str(changed)
    ]


def test_parquet_rows_are_resumed_by_their_bytes(tmp_path: Path) -> None:
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "bytes": [PNG + b"a", PNG + b"b"]}), table)
    out = tmp_path / "out"
    items = discover_inputs([str(table)], ".png")
    for item, data in zip(items, [PNG + b"a", PNG + b"b"], strict=True):
        _record(out, item.key, item.copy_to, data)
    assert resume(items, current_rows(out), out).skipped == 2
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "bytes": [PNG + b"a", PNG + b"X"]}), table)
    resumed = resume(items, current_rows(out), out)
    assert [i.key for i in resumed.pending] == [f"{table.resolve()}#path=b.png"]
    assert resumed.skipped == 1


def test_a_file_unreadable_then_and_now_keeps_its_row(tmp_path: Path) -> None:
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["gone.png"]}), listing)  # names a file not there
    out = tmp_path / "out"
    items = discover_inputs([str(listing)], ".png")
    _record_unreadable(out, items[0])
    assert resume(items, current_rows(out), out).skipped == 1
    (tmp_path / "gone.png").write_bytes(PNG)
    resumed = resume(items, current_rows(out), out)  # readable now: checked
    assert len(resumed.pending) == 1 and resumed.pending[0].supersedes == ""


def test_a_file_now_over_the_size_limit_is_a_change_and_its_copy_goes(tmp_path: Path) -> None:
    """It counted as `unavailable` (not read), so the copy of its old bytes stayed in
    OUT/pass/ beside a file that no longer holds them; the size alone says they differ."""
    from filter.images import ImageLimits

    limits = ImageLimits(max_bytes=64)
    grown, kept = tmp_path / "gen" / "grown.png", tmp_path / "gen" / "kept.png"
    grown.parent.mkdir()
    grown.write_bytes(PNG + b"small")
    kept.write_bytes(PNG + b"kept")
    out = tmp_path / "out"
    items = discover_inputs([str(tmp_path / "gen")], ".png")
    for item, path in zip(items, [grown, kept], strict=True):
        _record(out, item.key, item.copy_to, path.read_bytes())
    old_copy = out / "pass" / "gen" / "grown.png"
    grown.write_bytes(PNG + b"x" * 100)  # over the limit now
    resumed = resume(items, current_rows(out), out, limits=limits)
    assert (resumed.changed, resumed.unavailable, resumed.skipped) == (1, 0, 1)
    assert [i.key for i in resumed.pending] == [str(grown)]
    assert resumed.pending[0].supersedes == _sha(PNG + b"small")
    assert not old_copy.exists() and (out / "pass" / "gen" / "kept.png").is_file()
    os.remove(kept)  # missing now: nothing was read, the row and copy stay
    resumed = resume(items, current_rows(out), out, limits=limits)
    assert resumed.unavailable == 1 and (out / "pass" / "gen" / "kept.png").is_file()


def test_a_parquet_value_now_null_is_a_change_and_null_twice_is_not(tmp_path: Path) -> None:
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "bytes": [PNG + b"a", None]}), table)
    out = tmp_path / "out"
    items = discover_inputs([str(table)], ".png")
    _record(out, items[0].key, items[0].copy_to, PNG + b"a")
    _record_unreadable(out, items[1])
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "bytes": [None, None]}), table)
    resumed = resume(items, current_rows(out), out)
    assert (resumed.changed, resumed.unavailable, resumed.skipped) == (1, 0, 1)
    assert [i.key for i in resumed.pending] == [items[0].key]
    assert not (out / "pass" / "rows" / "a.png").exists()
