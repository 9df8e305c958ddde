"""Review of batch mode's robustness: one bad input must not stop (or hang) the batch, the
rows of one input must not take another's place, and a copy is never lost or replaced
because of another input. Plain functions, without Ray or models."""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.errors import BatchError, BatchInputError, ManifestError
from batch.inputs import InputItem, discover_inputs
from batch.manifest import COPY_PIXELS, current_rows, remove_unrecorded_copies
from batch.reading import load_rows
from batch.recording import record_rows
from batch.resume import resume
from batch.runner import Plan, execute_plan, plan_batch
from tests.batch_rows import RUN, manifest_row, sha256_hex

PNG = b"\x89PNG\r\n\x1a\n"


def _png(colour: tuple[int, int, int] = (90, 20, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _spec() -> Any:
    """What plan_batch asks of a FilterSpec, without an index."""
    return SimpleNamespace(run=lambda: RUN, copy_mode=COPY_PIXELS)


def _copies(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "pass").rglob("*") if p.is_file())


def test_any_exception_a_file_raises_becomes_its_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An animated WebP with a 70.001 s frame made the PNG encoder raise ValueError,
    which failed the whole Ray task (and its rerun)."""
    (tmp_path / "bad.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "good.png").write_bytes(_png())
    import batch.reading

    encode = batch.reading.checked_pixels_png

    def encoder_that_fails_on_one(content: Any) -> bytes:
        if int(content.views[0].pixels[0, 0, 0]) == 1:
            raise ValueError("cannot write duration")
        return encode(content)

    monkeypatch.setattr(batch.reading, "checked_pixels_png", encoder_that_fails_on_one)
    items = discover_inputs([str(tmp_path)], ".png")
    bad, good = load_rows([i.as_row() for i in items])
    assert bad["error"] == "cannot read the image: ValueError: cannot write duration"
    assert bad["copy"] is None and bad["view_pixels"] == []
    assert good["error"] is None and good["copy"] is not None


def test_a_fifo_among_the_inputs_is_an_error_row_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    items = discover_inputs([str(tmp_path)], ".png")
    result: dict[str, Any] = {}

    def load_and_resume() -> None:
        result["rows"] = load_rows([i.as_row() for i in items])
        # Resume hashes inputs that have a row: the FIFO must not block it either.
        current = {item.key: {"sha256": "0" * 64, "pass_copy": None} for item in items}
        result["resumed"] = resume(items, current, tmp_path / "out")

    worker = threading.Thread(target=load_and_resume, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        # Free every read that waits for a writer (else the test process never ends).
        while worker.is_alive():
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting just now
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(timeout=0.1)
        pytest.fail("reading a FIFO blocked")
    ok, stuck = result["rows"]
    assert ok["error"] is None
    assert stuck["error"] == "not a regular file (a FIFO, socket, device or folder)"
    assert result["resumed"].unavailable == 1


def test_a_nul_byte_in_a_parquet_path_is_that_rows_error(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    pq.write_table(pa.table({"path": ["ok.png", "b\x00d.png"]}), tmp_path / "list.parquet")
    items = discover_inputs([str(tmp_path / "list.parquet")], ".png")
    ok, bad = load_rows([i.as_row() for i in items])
    assert ok["error"] is None
    assert bad["error"] is not None and "NUL" in bad["error"]


def test_a_corrupt_parquet_file_is_refused_by_name(tmp_path: Path) -> None:
    """Garbled bytes made pyarrow raise OSError, ArrowInvalid or UnicodeDecodeError,
    none naming the file."""
    original = tmp_path / "orig.parquet"
    pq.write_table(pa.table({"path": [f"img/{i:05d}.png" for i in range(300)]}), original)
    intact = original.read_bytes()
    corrupt = tmp_path / "list.parquet"
    chance = random.Random(0)
    refused = 0
    for _ in range(60):
        garbled = bytearray(intact)
        for _ in range(chance.randint(1, 6)):
            garbled[chance.randrange(4, len(garbled) - 400)] = chance.randrange(256)
        corrupt.write_bytes(bytes(garbled))
        try:
            discover_inputs([str(corrupt)])
        except BatchInputError as exc:
            assert str(corrupt) in str(exc)
            refused += 1
    assert refused > 0


def test_a_long_file_name_is_copied(tmp_path: Path) -> None:
    """A 252-character name is a valid file name; `.{name}.tmp` was not."""
    copy_to = "long/" + "p" * 248 + ".png"
    (recorded,) = record_rows(tmp_path, [manifest_row("/in/long", "pass", copy_to, PNG)])
    assert recorded["pass_copy"] == f"pass/{copy_to}"
    assert (tmp_path / "pass" / copy_to).read_bytes() == PNG
    assert _copies(tmp_path) == [f"pass/{copy_to}"]  # no temporary left beside it


def test_a_copy_that_cannot_be_written_is_a_rejection_checked_again(tmp_path: Path) -> None:
    """A Parquet row may name a file no filesystem accepts: the row is rejected as
    `not_copied` (never a pass without its copy), the others are recorded, and a rerun
    checks it again."""
    images = [PNG + b"a", PNG + b"b"]
    table = pa.table({"path": ["x" * 300 + ".png", "ok.png"], "bytes": images})
    pq.write_table(table, tmp_path / "rows.parquet")
    items = discover_inputs([str(tmp_path / "rows.parquet")], ".png")
    out = tmp_path / "out"
    rows = [
        manifest_row(i.key, "pass", i.copy_to, data, sha256_hex(data))
        for i, data in zip(items, images, strict=True)
    ]
    too_long, ok = record_rows(out, rows)
    assert (too_long["verdict"], too_long["reason"], too_long["pass_copy"]) == (
        "reject",
        "not_copied",
        None,
    )
    assert "could not be written" in too_long["error"]
    assert ok["pass_copy"] == "pass/rows/ok.png" and _copies(out) == ["pass/rows/ok.png"]
    resumed = resume(items, current_rows(out), out)
    assert [i.key for i in resumed.pending] == [items[0].key] and resumed.skipped == 1


def test_a_file_and_a_folder_on_one_copy_path_are_refused(tmp_path: Path) -> None:
    """gen/a.jpg becomes gen/a.png, the folder holding gen/a.png/c.png."""
    gen = tmp_path / "gen"
    (gen / "a.png").mkdir(parents=True)
    (gen / "a.jpg").write_bytes(PNG)
    (gen / "a.png" / "c.png").write_bytes(PNG)
    with pytest.raises(BatchInputError, match=r"both be copied to pass/gen/a\.png"):
        discover_inputs([str(gen)], ".png")


def test_copy_original_names_without_a_suffix_reserve_their_sniffed_ones(
    tmp_path: Path,
) -> None:
    """Rows `foo` and `foo.png`: the first's copy gets its suffix from its bytes at record
    time, `.png` here, so both would have been written to pass/rows/foo.png."""
    table = pa.table({"path": ["foo", "foo.png"], "bytes": [PNG + b"A", PNG + b"B"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(BatchInputError, match=r"both be copied to pass/rows/foo\.png"):
        discover_inputs([str(tmp_path / "rows.parquet")], None)


def test_rows_of_two_parquet_files_keep_their_own_rows_and_copies(tmp_path: Path) -> None:
    """shard-1 then shard-2 (the same row names) into one OUT: shard-1's rows were
    taken as changed and their copies removed."""
    out = tmp_path / "out"
    for n in (1, 2):
        images = [PNG + b"s%d-1" % n, PNG + b"s%d-2" % n]
        shard = tmp_path / f"shard-{n}.parquet"
        pq.write_table(pa.table({"path": ["00001.png", "00002.png"], "bytes": images}), shard)
        plan = plan_batch([str(shard)], out, _spec())
        assert len(plan.pending) == 2 and plan.changed == 0
        record_rows(
            out,
            [
                manifest_row(i.key, "pass", i.copy_to, data, sha256_hex(data))
                for i, data in zip(plan.pending, images, strict=True)
            ],
        )
    assert _copies(out) == [
        "pass/shard-1/00001.png",
        "pass/shard-1/00002.png",
        "pass/shard-2/00001.png",
        "pass/shard-2/00002.png",
    ]
    assert len(current_rows(out)) == 4


def test_a_manifest_keying_parquet_rows_by_their_path_alone_is_refused(tmp_path: Path) -> None:
    record_rows(tmp_path, [manifest_row("00001.png", "pass", "shard-1/00001.png", PNG)])
    with pytest.raises(ManifestError, match="by their path alone"):
        current_rows(tmp_path)
    # Folder inputs' rows are keyed as before: their manifests stay usable.
    folder_only = tmp_path / "folders"
    record_rows(folder_only, [manifest_row("/in/a.png", "pass", "in/a.png", PNG)])
    assert set(current_rows(folder_only)) == {"/in/a.png"}


def test_an_input_unreadable_now_keeps_its_row_and_copy(tmp_path: Path) -> None:
    """A moved file and an unreachable URI: nothing was read, so nothing changed."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(PNG + b"a")
    gone_uri = f"file://{tmp_path}/unmounted/b.png"
    pq.write_table(pa.table({"path": ["imgs/a.png", gone_uri]}), tmp_path / "list.parquet")
    out = tmp_path / "out"
    items = discover_inputs([str(tmp_path / "list.parquet")], ".png")
    record_rows(
        out,
        [
            manifest_row(items[0].key, "pass", items[0].copy_to, b"copyA", sha256_hex(PNG + b"a")),
            manifest_row(items[1].key, "pass", items[1].copy_to, b"copyB", sha256_hex(b"b")),
        ],
    )
    before = _copies(out)
    (tmp_path / "imgs" / "a.png").rename(tmp_path / "a.moved")
    resumed = resume(items, current_rows(out), out)
    assert resumed.removed_copies == [] and _copies(out) == before
    assert (resumed.changed, resumed.pending, resumed.unavailable) == (0, [], 2)
    # Different bytes, once read, still replace the row and remove its copy.
    (tmp_path / "imgs" / "a.png").write_bytes(PNG + b"other")
    resumed = resume(items, current_rows(out), out)
    assert resumed.changed == 1 and resumed.removed_copies == [out / "pass/list/imgs/a.png"]


def test_a_copy_path_an_earlier_run_recorded_for_another_input_is_refused(
    tmp_path: Path,
) -> None:
    """Run 1 from X/gen, run 2 from Y/gen into one OUT: Y's copy replaced X's."""
    for folder in ("X", "Y"):
        (tmp_path / folder / "gen").mkdir(parents=True)
        (tmp_path / folder / "gen" / "a.png").write_bytes(PNG + folder.encode())
    out = tmp_path / "out"
    (x,) = plan_batch([str(tmp_path / "X" / "gen")], out, _spec()).pending
    record_rows(out, [manifest_row(x.key, "pass", x.copy_to, b"COPY-X", sha256_hex(PNG + b"X"))])
    with pytest.raises(BatchInputError) as refused:
        plan_batch([str(tmp_path / "Y" / "gen")], out, _spec())
    assert x.key in str(refused.value) and str(tmp_path / "Y" / "gen" / "a.png") in str(
        refused.value
    )
    assert (out / "pass" / "gen" / "a.png").read_bytes() == b"COPY-X"
    # The same input again is no conflict with its own copy.
    assert plan_batch([str(tmp_path / "X" / "gen")], out, _spec()).skipped == 1


def test_a_case_blind_out_refuses_a_recorded_copy_path_differing_only_by_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1 from X/gen, run 2 from Y/GEN into an OUT on a case-insensitive file system:
    pass/GEN/a.png is pass/gen/a.png there. The plan asks OUT's file system."""
    import batch.runner

    for folder, root in (("X", "gen"), ("Y", "GEN")):
        (tmp_path / folder / root).mkdir(parents=True)
        (tmp_path / folder / root / "a.png").write_bytes(PNG + folder.encode())
    out = tmp_path / "out"
    (x,) = plan_batch([str(tmp_path / "X" / "gen")], out, _spec()).pending
    record_rows(out, [manifest_row(x.key, "pass", x.copy_to, b"COPY-X", sha256_hex(PNG + b"X"))])
    assert plan_batch([str(tmp_path / "Y" / "GEN")], out, _spec()).pending  # tells them apart
    probed: list[Path] = []

    def case_blind(folder: Path) -> Callable[[str], str]:
        probed.append(folder)
        return str.casefold

    monkeypatch.setattr(batch.runner, "name_folding", case_blind)
    with pytest.raises(BatchInputError, match="already holds the copy") as refused:
        plan_batch([str(tmp_path / "Y" / "GEN")], out, _spec())
    assert x.key in str(refused.value) and probed == [out]


def test_out_named_through_dot_dot_or_a_symlink_is_not_an_input(tmp_path: Path) -> None:
    for variant in ("dots", "symlink"):
        gen = tmp_path / variant / "gen"
        (gen / "sub").mkdir(parents=True)
        (gen / "a.png").write_bytes(PNG)
        (tmp_path / variant / "alias").symlink_to(gen)
        out = gen / "sub" / ".." / "out" if variant == "dots" else gen.parent / "alias" / "out"
        (item,) = plan_batch([str(gen)], out, _spec()).pending
        record_rows(out, [manifest_row(item.key, "pass", item.copy_to, PNG, sha256_hex(PNG))])
        # OUT now holds pass/gen/a.png inside gen/: it is not listed as an input.
        again = plan_batch([str(gen)], out, _spec())
        assert (again.pending, again.skipped) == ([], 1), variant
        assert remove_unrecorded_copies(out) == 0


def test_a_stopped_run_reports_the_original_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data's wrapper ends with its retry hint, which the report used to be."""
    import ray.exceptions

    import batch.engine

    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "/w/batch/engine.py", line 180, in _record\n'
        "    recorded = record_rows(Path(out), _rows(table))\n"
        "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "OSError: [Errno 28] No space left on device\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/ray/data/_internal/planner/plan_udf_map_op.py", line 482, in fn\n'
        '    raise UserCodeException("UDF failed to process a data block.") from e\n'
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "To change retry attempts, configure `ray.data.DataContext.get_current()` if you "
        "believe this to be transient."
    )
    wrapper = ray.exceptions.UserCodeException("UDF failed to process a data block.")
    failure = ray.exceptions.RayTaskError(
        "MapBatches(_record)", traceback_text, wrapper, "ray::MapBatches(_record)", 1, "ip"
    ).as_instanceof_cause()

    def run_batch(*_: Any) -> dict[str, int]:
        raise failure

    monkeypatch.setattr(batch.engine, "run_batch", run_batch)
    monkeypatch.setattr(batch.engine, "ray_session", lambda _address: nullcontext())
    plan = Plan(RUN, [InputItem("/in/a.png", "/in/a.png", "in/a.png")], 0)
    with pytest.raises(BatchError) as stopped:
        execute_plan(plan, tmp_path, _spec(), batch.engine.RayOptions())
    assert "OSError: [Errno 28] No space left on device" in str(stopped.value)
    assert "transient" not in str(stopped.value)


def test_passes_that_could_not_be_copied_are_counted_apart_from_rejections() -> None:
    """`not_copied` rows are reject rows in the manifest, but the filter passed them: they
    were summed into `rejected`, so a run that copied nothing looked like a strict filter."""
    from batch.engine import count_recorded

    counts = count_recorded(
        ["pass", "reject", "reject", "reject"], [None, "identity_match", "not_copied", "no_face"]
    )
    assert counts == {"processed": 4, "passed": 1, "rejected": 2, "not_copied": 1}


def test_batch_exits_1_and_says_so_when_a_pass_was_not_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 0 with nothing on stderr let a pipeline hand on OUT/pass/ without the images
    whose copies failed (a full disk, say), unaware that a rerun had work to do."""
    import batch.runner
    from tests.commands import facegate

    summary: dict[str, Any] = {
        "processed": 3, "skipped": 0, "changed": 0, "unavailable": 0, "passed": 1,
        "rejected": 0, "not_copied": 2, "manifest": "m", "pass": str(tmp_path / "pass"),
        "index_fingerprint": "f",
    }  # fmt: skip
    monkeypatch.setattr(batch.runner, "plan_batch", lambda *_: Plan(RUN, [], 0))
    monkeypatch.setattr(batch.runner, "execute_plan", lambda *_args, **_kw: dict(summary))
    args = ["batch", "--index", str(tmp_path / "index"), "--out", str(tmp_path / "out")]
    result = facegate(*args, str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "2 passed images could not be copied" in result.stderr
    assert "rerun" in result.stderr
    summary["not_copied"] = 0
    assert facegate(*args, str(tmp_path)).returncode == 0


def test_the_documented_current_row_recipe_agrees_with_a_rerun(tmp_path: Path) -> None:
    """docs/batch.md's pandas recipe took the rows no `(path, supersedes)` names: a file
    that changed back to earlier bytes, and a `not_copied` row checked again, then had no
    current row at all."""
    import re
    from datetime import UTC, datetime, timedelta

    import pandas as pd

    from batch.manifest import write_fragment
    from tests.conftest import REPO

    start = datetime(2026, 12, 1, tzinfo=UTC)
    a, b = "a" * 64, "b" * 64
    history = [  # (path, sha256, supersedes, reason)
        ("/in/back.png", a, None, None),
        ("/in/back.png", b, a, None),
        ("/in/back.png", a, b, None),  # changed back to its first bytes
        ("/in/full.png", a, None, "not_copied"),
        ("/in/full.png", a, a, None),  # checked again, copied this time
        ("/in/once.png", b, None, None),
    ]
    for minute, (path, sha, supersedes, reason) in enumerate(history):
        row = manifest_row(path, "pass", "x.png", None, sha)
        row |= {"supersedes": supersedes, "recorded_at": start + timedelta(minutes=minute)}
        if reason:
            row |= {"verdict": "reject", "reason": reason}
        write_fragment(tmp_path, [row])

    text = (REPO / "docs/batch.md").read_text()
    recipe = re.search(r"^current = (.+)$", text, re.M)
    assert recipe, "docs/batch.md no longer shows how to select the current rows"
    manifest = pd.read_parquet(tmp_path / "manifest")
    current = eval(recipe[1], {"manifest": manifest, "pd": pd})
    documented = {(r.path, r.sha256, r.recorded_at) for r in current.itertuples()}
    expected = {
        (path, row["sha256"], pd.Timestamp(row["recorded_at"]))
        for path, row in current_rows(tmp_path).items()
    }
    assert len(expected) == 3 and documented == expected


@pytest.mark.timeout(20, method="thread")  # a blocked open() ignores signals
def test_a_fifo_a_glob_names_as_parquet_is_refused_not_waited_on(tmp_path: Path) -> None:
    """`shards/*.parquet` matching a FIFO blocked the listing (pyarrow opened it and
    waited for a writer) before any image was read."""
    good = tmp_path / "a.parquet"
    pq.write_table(pa.table({"path": ["x.png"], "bytes": [PNG]}), good)
    os.mkfifo(tmp_path / "b.parquet")
    with pytest.raises(BatchInputError, match=r"b\.parquet: a Parquet input must be a regular"):
        discover_inputs([str(tmp_path / "*.parquet")], ".png")
    assert [i.copy_to for i in discover_inputs([str(good)], ".png")] == ["a/x.png"]
