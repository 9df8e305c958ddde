"""A rerun of `facegate batch` with the real models plans only the images that have no row
yet, and removes the copies no row vouches for."""

from __future__ import annotations

from pathlib import Path

from batch.checking import FilterSpec
from batch.recording import record_rows
from batch.runner import plan_batch
from filter.assembly import EmbeddingSpec
from tests.batch_rows import input_tree, manifest_row, sha256_hex


def test_a_rerun_plans_only_the_images_without_a_row(
    tmp_path: Path, identities_dir: Path, models_dir: Path, full_index: Path
) -> None:
    root = input_tree(tmp_path / "gen", identities_dir)
    out = root / "out"  # inside the input: its copies are not inputs
    # What a run that stopped after a copy, before its first fragment, leaves.
    (out / "manifest").mkdir(parents=True)
    (out / "pass" / "gen").mkdir(parents=True)
    (out / "pass" / "gen" / "a.png").write_bytes((root / "a.jpg").read_bytes())
    spec = FilterSpec(EmbeddingSpec("sface", models_dir), full_index)
    first = plan_batch([str(root)], out, spec)
    assert len(first.pending) == 2 and first.skipped == 0
    assert first.pending[0].copy_to == "gen/a.png"  # a PNG of the checked pixels
    assert not (out / "pass" / "gen" / "a.png").exists()  # no row vouches for it
    done = first.pending[0]
    digest = sha256_hex((root / "a.jpg").read_bytes())
    record_rows(
        out,
        [{**manifest_row(done.key, "reject", done.copy_to, None, digest), **first.run.columns()}],
    )
    second = plan_batch([str(root)], out, spec)
    assert second.pending == first.pending[1:] and second.skipped == 1
