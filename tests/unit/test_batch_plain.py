"""Batch mode's logic without Ray: inputs, reading, the manifest, resume, the copies."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.errors import BatchInputError
from batch.inputs import discover_inputs
from batch.manifest import (
    COPY_ORIGINAL,
    check_out_folder,
    check_run_identity,
    current_rows,
    fragments,
    read_manifest,
    remove_partial_fragments,
    remove_unrecorded_copies,
)
from batch.reading import load_rows
from batch.recording import record_rows
from filter.decide import NoFacePolicy
from tests.batch_rows import RUN, input_tree, manifest_row, manifest_run, sha256_hex

PNG = b"\x89PNG\r\n\x1a\n"


def test_folders_are_listed_recursively_with_copies_under_the_root_name(
    tmp_path: Path, identities_dir: Path
) -> None:
    root = input_tree(tmp_path / "gen", identities_dir)
    items = discover_inputs([str(root)])
    assert [i.copy_to for i in items] == ["gen/a.jpg", "gen/sub/deeper/b.JPG"]
    assert items[0].key == str((root / "a.jpg").absolute()) and items[0].row == -1
    # Copies of checked pixels are PNGs: the suffix changes with them.
    as_png = discover_inputs([str(root)], ".png")
    assert [i.copy_to for i in as_png] == ["gen/a.png", "gen/sub/deeper/b.png"]
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
    # Two files that differ by their suffix only would both become x/1.png.
    (tmp_path / "x" / "same" / "1.jpg").write_bytes(PNG)
    assert len(discover_inputs([str(tmp_path / "x" / "same")])) == 2
    with pytest.raises(BatchInputError, match="differ only by their suffix"):
        discover_inputs([str(tmp_path / "x" / "same")], ".png")
    pq.write_table(pa.table({"n": [1]}), tmp_path / "numbers.parquet")
    with pytest.raises(BatchInputError, match="no image column"):
        discover_inputs([str(tmp_path / "numbers.parquet")])


def test_names_a_case_or_form_blind_out_takes_for_one_are_refused_before_the_run(
    tmp_path: Path,
) -> None:
    """On a file system that ignores case (macOS, Windows) or Unicode form (macOS), two
    copies whose paths differ only so are one file: the second overwrote the first's
    copy, or failed at record time. Refused before anything is read."""
    import unicodedata

    from batch.targets import name_folding

    folder = tmp_path / "gen"
    folder.mkdir()
    for name in ("Face.png", "face.png", unicodedata.normalize("NFD", "é.png"), "é.png"):
        (folder / name).write_bytes(PNG)
    # This machine's tmp folder tells them apart: four copies, as before.
    assert name_folding(tmp_path)("Face.png") == "Face.png"
    assert len(discover_inputs([str(folder)], ".png", fold=name_folding(tmp_path))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".facegate-names")]

    def case_blind(name: str) -> str:
        return name.casefold()

    def form_blind(name: str) -> str:
        return unicodedata.normalize("NFC", name)

    for fold, named in ((case_blind, "Face.png"), (form_blind, "é.png")):
        with pytest.raises(BatchInputError, match="ignores case or Unicode form") as refused:
            discover_inputs([str(folder)], ".png", fold=fold)
        assert named.casefold() in unicodedata.normalize("NFC", str(refused.value)).casefold()


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
    # Keys are tied to their Parquet file: another file's rows of the same names are
    # other images.
    parquet = (tmp_path / "rows.parquet").resolve()
    assert [i.key for i in items] == [
        f"{parquet}#path=gen/0.png",
        f"{parquet}#row=1",
        f"{parquet}#path=../up/2.png",
        f"{parquet}#path=s3://bucket/3.png",
        f"{parquet}#path=gen/4.png",
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
    assert [r["sha256"] for r in loaded] == [None, sha256_hex(images[3]), sha256_hex(images[2])]
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
    parquet = (tmp_path / "p.parquet").resolve()
    assert [i.key for i in items] == [f"{parquet}#path=imgs/a.jpg", f"{parquet}#path=imgs/gone.jpg"]
    loaded = load_rows([i.as_row() for i in items])
    assert loaded[0]["error"] is None and loaded[0]["view_heights"][0] > 0
    assert loaded[0]["view_pixels"] and loaded[0]["copy"].startswith(PNG)
    assert loaded[1]["error"].startswith("cannot read file")


def test_only_passed_images_are_copied_and_then_recorded(tmp_path: Path) -> None:
    rows = [
        manifest_row("/in/a.png", "pass", "in/a.png", PNG + b"a"),
        manifest_row("/in/b.png", "reject", "in/b.png", None),
        manifest_row("x.parquet#row=3", "pass", "x/row-000000003", PNG + b"c"),
    ]
    recorded = record_rows(tmp_path, rows)
    assert (tmp_path / "pass" / "in" / "a.png").read_bytes() == PNG + b"a"
    assert not (tmp_path / "pass" / "in" / "b.png").exists()
    assert (tmp_path / "pass" / "x" / "row-000000003.png").read_bytes() == PNG + b"c"
    assert [r["pass_copy"] for r in recorded] == ["pass/in/a.png", None, "pass/x/row-000000003.png"]
    assert [r["pass_sha256"] for r in recorded] == [
        sha256_hex(PNG + b"a"),
        None,
        sha256_hex(PNG + b"c"),
    ]
    table = read_manifest(tmp_path)
    assert table.column("path").to_pylist() == ["/in/a.png", "/in/b.png", "x.parquet#row=3"]
    # A passed row whose bytes are missing stops the block before anything is recorded.
    with pytest.raises(Exception, match="without its bytes"):
        record_rows(tmp_path, [manifest_row("/in/c.png", "pass", "in/c.png", None)])
    assert read_manifest(tmp_path).num_rows == 3


def test_resume_sees_whole_fragments_only_and_refuses_another_index(tmp_path: Path) -> None:
    record_rows(tmp_path, [manifest_row("/in/a.png", "reject", "in/a.png", None)])
    half_written = tmp_path / "manifest" / ".part-crashed.parquet.tmp"
    half_written.write_bytes(b"PAR1 half a fragment")
    assert set(current_rows(tmp_path)) == {"/in/a.png"}
    remove_partial_fragments(tmp_path)
    assert not half_written.exists() and len(fragments(tmp_path)) == 1
    check_run_identity(tmp_path, RUN)
    for other in (
        manifest_run("another", 0.4),
        manifest_run("fingerprint1", 0.5),
        manifest_run("fingerprint1", 0.4, COPY_ORIGINAL),  # another kind of copy
        # Images without a face passed under `--no-face-policy pass`: a rejecting run
        # must not keep their copies by resuming.
        manifest_run("fingerprint1", 0.4, no_face_policy=NoFacePolicy.PASS.value),
    ):
        with pytest.raises(Exception, match="new --out"):
            check_run_identity(tmp_path, other)
    assert current_rows(tmp_path / "fresh") == {}


def test_a_manifest_of_an_earlier_facegate_is_refused(tmp_path: Path) -> None:
    """Its copies were made byte for byte under the old rule: never resumed into."""
    old = pa.table({"path": ["/in/a.png"], "verdict": ["pass"], "pass_copy": ["pass/a.png"]})
    (tmp_path / "manifest").mkdir()
    pq.write_table(old, tmp_path / "manifest" / "part-old.parquet")
    with pytest.raises(Exception, match="earlier facegate"):
        check_run_identity(tmp_path, RUN)


def test_rows_carry_every_image_and_a_copy_only_when_accounted_for(
    tmp_path: Path, identities_dir: Path
) -> None:
    """The read step hands the actors every image a file shows (later frames, the colour
    under transparent pixels) and what it could not read; only a file accounted for
    completely gets a copy, and by default that copy is a PNG of the checked pixels."""
    face = Image.open(identities_dir / "id01" / "01.jpg").convert("RGB").resize((96, 96))
    blank = Image.new("RGB", (96, 96), (128, 128, 128))
    face.save(tmp_path / "plain.png")
    blank.save(tmp_path / "two_frames.gif", save_all=True, append_images=[face])
    hidden = face.convert("RGBA")
    hidden.putalpha(0)  # the face is still in the colour channels
    hidden.save(tmp_path / "transparent.png")
    (tmp_path / "trailing.png").write_bytes((tmp_path / "plain.png").read_bytes() + b"more")
    names = ["plain.png", "two_frames.gif", "transparent.png", "trailing.png"]
    items = discover_inputs([str(tmp_path / n) for n in names])
    loaded = {Path(r["source"]).name: r for r in load_rows([i.as_row() for i in items])}
    assert loaded["plain.png"]["view_names"] == ["image"]
    assert loaded["two_frames.gif"]["view_names"] == ["frame 1", "frame 2"]
    assert loaded["two_frames.gif"]["frames"] == 2
    assert loaded["transparent.png"]["view_names"][1].endswith("transparent pixels")
    assert loaded["trailing.png"]["unaccounted"] and loaded["trailing.png"]["copy"] is None
    for name in names[:3]:
        copy = loaded[name]["copy"]
        assert copy.startswith(PNG) and b"tEXt" not in copy and b"eXIf" not in copy, name
    original = load_rows([items[0].as_row()], copy_original=True)[0]
    assert original["copy"] == (tmp_path / "plain.png").read_bytes()


def test_copies_no_row_names_are_removed_before_a_rerun(tmp_path: Path) -> None:
    """A batch that crashed after copying and before its fragment leaves copies the
    manifest does not vouch for (a rerun may use another index): they go."""
    record_rows(tmp_path, [manifest_row("/in/a.png", "pass", "in/a.png", PNG + b"a")])
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


def test_out_must_be_new_empty_or_a_batchs_own(tmp_path: Path) -> None:
    """A run removes what OUT/pass/ holds that its manifest does not name: an OUT that is
    somebody's folder is refused before anything is read (review finding)."""
    from batch.errors import ManifestError
    from batch.runner import plan_batch

    theirs = tmp_path / "theirs"
    (theirs / "pass").mkdir(parents=True)
    (theirs / "pass" / "holiday.jpg").write_bytes(b"keep")
    with pytest.raises(ManifestError, match="not a batch's OUT"):
        plan_batch([str(tmp_path)], theirs, None)  # type: ignore[arg-type]
    assert (theirs / "pass" / "holiday.jpg").read_bytes() == b"keep"
    (tmp_path / "a-file").write_text("keep")
    with pytest.raises(ManifestError, match="is a file"):
        check_out_folder(tmp_path / "a-file")
    check_out_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty")
    (tmp_path / "earlier" / "manifest").mkdir(parents=True)
    (tmp_path / "earlier" / "pass").mkdir()
    check_out_folder(tmp_path / "earlier")
