"""Batch mode's logic without Ray: inputs, reading, the manifest, resume, the copies."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.checking import FilterSpec
from batch.inputs import BatchInputError, discover_inputs
from batch.manifest import (
    RunIdentity,
    fragments,
    read_manifest,
    recorded_paths,
    remove_partial_fragments,
    remove_unrecorded_copies,
    write_fragment,
)
from batch.reading import load_rows
from batch.recording import record_rows
from batch.runner import plan_batch
from filter.runtime import EmbeddingSpec

RUN = RunIdentity("fingerprint1", 0.4, None)
PNG = b"\x89PNG\r\n\x1a\n"


def _tree(root: Path, identities_dir: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.jpg").write_bytes((identities_dir / "id01" / "01.jpg").read_bytes())
    (root / "sub" / "deeper" / "b.JPG").write_bytes(b"not an image")
    (root / "sub" / "notes.txt").write_text("not listed")
    return root


def test_folders_are_listed_recursively_with_copies_under_the_root_name(
    tmp_path: Path, identities_dir: Path
) -> None:
    root = _tree(tmp_path / "gen", identities_dir)
    items = discover_inputs([str(root)])
    assert [i.copy_to for i in items] == ["gen/a.jpg", "gen/sub/deeper/b.JPG"]
    assert items[0].key == str((root / "a.jpg").absolute()) and items[0].row == -1
    # A glob keeps paths under the folder above its first wildcard; a file named twice is
    # listed once.
    globbed = discover_inputs([str(root / "**" / "*.JPG"), str(root / "sub/deeper/b.JPG")])
    assert [i.copy_to for i in globbed] == ["gen/sub/deeper/b.JPG"]


def test_inputs_that_name_nothing_or_collide_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="no such file"):
        discover_inputs([str(tmp_path / "missing")])
    for name in ("x", "y"):
        (tmp_path / name / "same").mkdir(parents=True)
        (tmp_path / name / "same" / "1.png").write_bytes(PNG)
    with pytest.raises(BatchInputError, match="both be copied"):
        discover_inputs([str(tmp_path / "x" / "same"), str(tmp_path / "y" / "same")])
    pq.write_table(pa.table({"n": [1]}), tmp_path / "numbers.parquet")
    with pytest.raises(BatchInputError, match="no image column"):
        discover_inputs([str(tmp_path / "numbers.parquet")])


def test_parquet_rows_are_read_from_the_row_groups_that_hold_them(tmp_path: Path) -> None:
    images = [PNG + bytes([i]) * 20 for i in range(5)]
    table = pa.table(
        {
            "path": ["gen/0.png", None, "../up/2.png", "s3://bucket/3.png", "gen/4.png"],
            "bytes": pa.array([*images[:4], None], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    items = discover_inputs([str(tmp_path / "rows.parquet")])
    assert [i.key for i in items] == [
        "gen/0.png",
        f"{tmp_path / 'rows.parquet'}#row=1",
        "../up/2.png",
        "s3://bucket/3.png",
        "gen/4.png",
    ]
    assert [i.copy_to for i in items] == [
        "rows/gen/0.png",
        "rows/row-000000001",
        "rows/up/2.png",
        "rows/bucket/3.png",
        "rows/gen/4.png",
    ]
    # Rows from the second and third row groups only, out of order: each gets its bytes.
    loaded = load_rows([items[4].as_row(), items[3].as_row(), items[2].as_row()])
    assert [r["data"] for r in loaded] == [None, images[3], images[2]]
    assert loaded[0]["error"] == "the Parquet row holds no image bytes"
    assert all("corrupt" in r["error"] or "not a recognised" in r["error"] for r in loaded[1:])
    assert loaded[1]["sha256"] is not None and loaded[0]["sha256"] is None


def test_parquet_paths_are_read_beside_the_parquet_file(
    tmp_path: Path, identities_dir: Path
) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes((identities_dir / "id02" / "01.jpg").read_bytes())
    pq.write_table(pa.table({"path": ["imgs/a.jpg", "imgs/gone.jpg"]}), tmp_path / "p.parquet")
    items = discover_inputs([str(tmp_path / "p.parquet")])
    assert [i.key for i in items] == ["imgs/a.jpg", "imgs/gone.jpg"]
    loaded = load_rows([i.as_row() for i in items])
    assert loaded[0]["error"] is None and loaded[0]["height"] > 0 and loaded[0]["pixels"]
    assert loaded[1]["error"].startswith("cannot read file")


def _row(path: str, verdict: str, copy_to: str, data: bytes | None) -> dict[str, object]:
    return {
        "path": path,
        "sha256": "0" * 64,
        "verdict": verdict,
        "reason": None if verdict == "pass" else "identity_match",
        "faces": 1,
        "max_similarity": 0.2,
        "identity": None,
        "replica_similarity": None,
        "error": None,
        "copy_to": copy_to,
        "data": data,
        **RUN.columns(),
    }


def test_only_passed_images_are_copied_and_then_recorded(tmp_path: Path) -> None:
    rows = [
        _row("/in/a.png", "pass", "in/a.png", PNG + b"a"),
        _row("/in/b.png", "reject", "in/b.png", None),
        _row("x.parquet#row=3", "pass", "x/row-000000003", PNG + b"c"),
    ]
    recorded = record_rows(tmp_path, rows)
    assert (tmp_path / "pass" / "in" / "a.png").read_bytes() == PNG + b"a"
    assert not (tmp_path / "pass" / "in" / "b.png").exists()
    assert (tmp_path / "pass" / "x" / "row-000000003.png").read_bytes() == PNG + b"c"
    assert [r["pass_copy"] for r in recorded] == ["pass/in/a.png", None, "pass/x/row-000000003.png"]
    table = read_manifest(tmp_path)
    assert table.column("path").to_pylist() == ["/in/a.png", "/in/b.png", "x.parquet#row=3"]
    # A passed row whose bytes are missing stops the block before anything is recorded.
    with pytest.raises(Exception, match="without its bytes"):
        record_rows(tmp_path, [_row("/in/c.png", "pass", "in/c.png", None)])
    assert read_manifest(tmp_path).num_rows == 3


def test_resume_sees_whole_fragments_only_and_refuses_another_index(tmp_path: Path) -> None:
    write_fragment(tmp_path, [_row("/in/a.png", "reject", "in/a.png", None)])
    half_written = tmp_path / "manifest" / ".part-crashed.parquet.tmp"
    half_written.write_bytes(b"PAR1 half a fragment")
    assert recorded_paths(tmp_path, RUN) == {"/in/a.png"}
    remove_partial_fragments(tmp_path)
    assert not half_written.exists() and len(fragments(tmp_path)) == 1
    with pytest.raises(Exception, match="new --out"):
        recorded_paths(tmp_path, RunIdentity("another", 0.4, None))
    with pytest.raises(Exception, match="new --out"):
        recorded_paths(tmp_path, RunIdentity("fingerprint1", 0.5, None))
    assert recorded_paths(tmp_path / "fresh", RUN) == set()


def test_a_rerun_plans_only_the_images_without_a_row(
    tmp_path: Path, identities_dir: Path, models_dir: Path, full_index: Path
) -> None:
    root = _tree(tmp_path / "gen", identities_dir)
    out = root / "out"  # inside the input: its copies are not inputs
    (out / "pass" / "gen").mkdir(parents=True)
    (out / "pass" / "gen" / "a.jpg").write_bytes((root / "a.jpg").read_bytes())
    spec = FilterSpec(EmbeddingSpec("sface", models_dir), full_index)
    first = plan_batch([str(root)], out, spec)
    assert len(first.pending) == 2 and first.skipped == 0
    done = first.pending[0]
    write_fragment(out, [{**_row(done.key, "reject", done.copy_to, None), **first.run.columns()}])
    second = plan_batch([str(root)], out, spec)
    assert second.pending == first.pending[1:] and second.skipped == 1


def test_bytes_holding_more_than_the_checked_frame_are_not_copied(
    tmp_path: Path, identities_dir: Path
) -> None:
    """A copy is the original bytes: a later frame, or a face under transparent pixels,
    would leave unchecked. Such files get an error (reject) row; plain images do not."""
    face = Image.open(identities_dir / "id01" / "01.jpg").convert("RGB").resize((96, 96))
    blank = Image.new("RGB", (96, 96), (128, 128, 128))
    files = {
        "plain.png": face,
        "opaque_alpha.png": face.convert("RGBA"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    # Frame 0 is blank, frame 1 is the face: only frame 0 would be checked.
    blank.save(tmp_path / "two_frames.gif", save_all=True, append_images=[face])
    hidden = face.convert("RGBA")
    hidden.putalpha(0)  # the face is still in the colour channels
    hidden.save(tmp_path / "transparent.png")
    names = ["plain.png", "opaque_alpha.png", "two_frames.gif", "transparent.png"]
    items = discover_inputs([str(tmp_path / n) for n in names])
    loaded = {Path(r["source"]).name: r for r in load_rows([i.as_row() for i in items])}
    assert loaded["plain.png"]["error"] is None and loaded["plain.png"]["pixels"]
    assert loaded["opaque_alpha.png"]["error"] is None
    assert "2 frames" in loaded["two_frames.gif"]["error"]
    assert loaded["two_frames.gif"]["pixels"] is None
    assert "transparent" in loaded["transparent.png"]["error"]
    assert loaded["transparent.png"]["pixels"] is None


def test_copies_no_row_names_are_removed_before_a_rerun(tmp_path: Path) -> None:
    """A batch that crashed after copying and before its fragment leaves copies the
    manifest does not vouch for (a rerun may use another index): they go."""
    record_rows(tmp_path, [_row("/in/a.png", "pass", "in/a.png", PNG + b"a")])
    stray = tmp_path / "pass" / "in" / "crashed.png"
    stray.write_bytes(PNG + b"unrecorded")
    half = tmp_path / "pass" / "in" / ".other.png.tmp"
    half.write_bytes(PNG)
    assert remove_unrecorded_copies(tmp_path) == 2
    assert not stray.exists() and not half.exists()
    assert (tmp_path / "pass" / "in" / "a.png").read_bytes() == PNG + b"a"
    # With no manifest at all, every copy is unrecorded.
    lone = tmp_path / "fresh" / "pass" / "x.png"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(PNG)
    assert remove_unrecorded_copies(tmp_path / "fresh") == 1 and not lone.exists()
