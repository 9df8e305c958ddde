"""Batch mode on a real (local) Ray: `facegate index build --ray` gives the single-process
vectors, and `facegate batch` gives check's verdicts, copies what passed, and resumes.
Two Ray jobs in all (each has a fixed cost); the rest of the logic is tested without Ray
in tests/unit/test_batch_plain.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.manifest import fragments, read_manifest
from bench.scenes import crowd_of
from filter.assembly import detector_manifest
from filter.content import read_content
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from service.cli import main
from tests.conftest import make_gallery
from tests.content_probes import encode, hiding_places, load, probe_files

pytestmark = pytest.mark.usefixtures("local_ray")


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    lines = capsys.readouterr().out.strip().splitlines()
    return dict(json.loads(lines[-1]))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, identities_dir: Path) -> Path:
    return make_gallery(identities_dir, tmp_path_factory.mktemp("ray") / "g", ["id01", "id02"])


@pytest.fixture(scope="module")
def ray_index(tmp_path_factory: pytest.TempPathFactory, gallery: Path, models_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("ray") / "index"
    code = main(["index", "build", str(gallery), "--out", str(out), "--ray", *_models(models_dir)])
    assert code == 0
    return out


def _models(models_dir: Path) -> list[str]:
    return ["--models-dir", str(models_dir), "--device", "cpu"]


def test_index_built_on_ray_has_the_single_process_vectors_and_manifest(
    ray_index: Path, gallery: Path, pipeline: FaceEmbeddingPipeline
) -> None:
    single, _ = build_gallery_index(
        gallery, pipeline, detector_settings=detector_manifest(pipeline)
    )
    on_ray = FaissIdentityIndex.load(ray_index)
    assert on_ray.vector_count == single.vector_count > 0
    assert np.array_equal(on_ray.faces.vectors(), single.faces.vectors())  # bitwise
    assert on_ray.faces.identities == single.faces.identities
    assert on_ray.faces.sources == single.faces.sources

    def without_build_time(manifest: dict[str, object]) -> dict[str, object]:
        # Each build has its own time and draws its own salt (the seeds' salt, issue 20).
        return {k: v for k, v in manifest.items() if k not in ("built_at", "salt")}

    # The same manifest, file hashes included: the saved FAISS bytes are the same.
    single.save(ray_index.parent / "single")
    saved = FaissIdentityIndex.load(ray_index.parent / "single").manifest
    assert without_build_time(on_ray.manifest) == without_build_time(saved)
    assert on_ray.salt and saved["salt"] and on_ray.salt.hex() != saved["salt"]


def _inputs(root: Path, identities_dir: Path, faces_dir: Path) -> tuple[list[str], dict[str, Path]]:
    """A folder of images (one unreadable, and the probes of issue 19: a stranger that also
    carries an enrolled face), a Parquet file of image bytes and one of paths; and for
    each manifest path, a file holding the same bytes, for `check`."""
    folder = root / "generated"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(identities_dir / "id01" / "03.jpg", folder / "member.jpg")
    shutil.copy(identities_dir / "id05" / "01.jpg", folder / "sub" / "stranger.jpg")
    shutil.copy(faces_dir / "multi" / "two-people.jpg", folder / "sub" / "two.jpg")
    Image.fromarray(crowd_of(identities_dir / "id05" / "01.jpg", 32)).save(folder / "crowd.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    probe_files(folder / "probes", identities_dir)
    junk = root / "junk.bin"
    junk.write_bytes(b"not an image at all")
    as_bytes = root / "rows.parquet"
    row_sources = [identities_dir / "id06" / "01.jpg", junk]
    pq.write_table(
        pa.table({"bytes": pa.array([p.read_bytes() for p in row_sources], pa.binary())}),
        as_bytes,
    )
    (root / "listed").mkdir()
    shutil.copy(identities_dir / "id02" / "02.jpg", root / "listed" / "x.jpg")
    as_paths = root / "list.parquet"
    pq.write_table(pa.table({"path": ["listed/x.jpg"]}), as_paths)
    same_bytes = {str(p.absolute()): p for p in sorted(folder.rglob("*")) if p.is_file()}
    same_bytes |= {f"{as_bytes.resolve()}#row={i}": p for i, p in enumerate(row_sources)}
    same_bytes[f"{as_paths.resolve()}#path=listed/x.jpg"] = root / "listed" / "x.jpg"
    return [str(folder), str(as_bytes), str(as_paths)], same_bytes


def test_batch_gives_checks_verdicts_copies_what_passed_and_resumes(
    ray_index: Path,
    identities_dir: Path,
    faces_dir: Path,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs, same_bytes = _inputs(tmp_path / "in", identities_dir, faces_dir)
    out = tmp_path / "out"
    command = ["batch", "--index", str(ray_index), "--out", str(out), "--batch-size", "3"]
    assert main(command + _models(models_dir) + inputs) == 0
    summary = _last_json(capsys)
    rows = read_manifest(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(same_bytes)
    probes = len(hiding_places()) + 2  # and a camera JPEG and a plain PNG of the stranger
    assert summary["processed"] == len(rows) == 8 + probes and summary["skipped"] == 0
    assert summary["passed"] == sum(r["verdict"] == "pass" for r in rows)
    assert summary["rejected"] == sum(r["verdict"] == "reject" for r in rows)
    assert summary["not_copied"] == 0
    assert len(fragments(out)) >= 8  # one per block of 3: a crash loses only blocks in flight

    # The very verdicts of `facegate check` on the same bytes.
    assert (
        main(
            ["check", "--index", str(ray_index)]
            + _models(models_dir)
            + [str(p) for p in same_bytes.values()]
        )
        == 0
    )
    checked = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    by_file = {line["path"]: line for line in checked}
    for row in rows:
        expected = by_file[str(same_bytes[row["path"]])]
        columns = ("verdict", "reason", "faces", "identity", "images", "part")
        assert tuple(row[c] for c in columns) == tuple(expected[c] for c in columns), row["path"]
        similarity = None if row["max_similarity"] is None else round(row["max_similarity"], 6)
        assert similarity == expected["max_similarity"], row["path"]
    reasons = {r["reason"] for r in rows}
    # passes, members, broken files, and bytes after the end of a probe
    assert {"identity_match", "unreadable", "unchecked_content", "too_many_faces", None} <= reasons
    for row in rows:
        if "/probes/" in row["path"] and "camera" not in row["path"] and "plain" not in row["path"]:
            assert row["verdict"] == "reject", row  # on main, 3 of these were copied
    crowd = next(r for r in rows if r["reason"] == "too_many_faces")
    assert crowd["faces"] > 256 and "more than the 256" in crowd["error"]

    # Copies of exactly the passed images, under the input root's name: PNGs of the
    # pixels that were checked, nothing else (no EXIF, no thumbnail, no trailing bytes).
    copies = {p.relative_to(out).as_posix() for p in (out / "pass").rglob("*") if p.is_file()}
    assert copies == {r["pass_copy"] for r in rows if r["verdict"] == "pass"}
    assert "pass/generated/sub/stranger.png" in copies
    assert "pass/rows/row-000000000.png" in copies
    for row in rows:
        source = same_bytes[row["path"]].read_bytes()
        assert row["sha256"] == hashlib.sha256(source).hexdigest()
        if row["pass_copy"]:
            copy = (out / row["pass_copy"]).read_bytes()
            assert row["pass_sha256"] == hashlib.sha256(copy).hexdigest()
            assert np.array_equal(decode_image(copy), decode_image(source)), row["path"]
            assert read_content(copy).complete and len(read_content(copy).views) == 1
    assert {r["index_fingerprint"] for r in rows} == {
        FaissIdentityIndex.load(ray_index).fingerprint
    }

    # A second run over the same input adds nothing (and checks no image again).
    before = fragments(out)
    assert main(command + _models(models_dir) + inputs) == 0
    again = _last_json(capsys)
    assert again["processed"] == 0 and again["skipped"] == 8 + probes
    assert fragments(out) == before and read_manifest(out).num_rows == 8 + probes

    # A passed file replaced by an enrolled face: checked again, its row superseded, its
    # old copy gone (on main it was skipped and its row still said pass).
    stranger = next(r for r in rows if r["path"].endswith("sub/stranger.jpg"))
    Path(stranger["path"]).write_bytes((identities_dir / "id02" / "03.jpg").read_bytes())
    assert main(command + _models(models_dir) + inputs) == 0
    third = _last_json(capsys)
    assert (third["processed"], third["changed"], third["skipped"]) == (1, 1, 7 + probes)
    history = [r for r in read_manifest(out).to_pylist() if r["path"] == stranger["path"]]
    assert len(history) == 2
    newest = max(history, key=lambda r: r["recorded_at"])
    assert (newest["verdict"], newest["identity"]) == ("reject", "id02")
    assert newest["supersedes"] == stranger["sha256"]
    assert not (out / stranger["pass_copy"]).exists()


def test_copy_original_copies_the_bytes_of_files_accounted_for(
    ray_index: Path,
    identities_dir: Path,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shown = load(identities_dir / "id05" / "01.jpg")
    (folder / "stranger.jpg").write_bytes(encode(shown, "JPEG"))
    (folder / "padded.jpg").write_bytes(encode(shown, "JPEG") + b"after the end")
    out = tmp_path / "out"
    command = ["batch", "--index", str(ray_index), "--out", str(out), "--copy-original"]
    assert main(command + _models(models_dir) + [str(folder)]) == 0
    rows = {Path(r["path"]).name: r for r in read_manifest(out).to_pylist()}
    assert rows["stranger.jpg"]["pass_copy"] == "pass/in/stranger.jpg"
    assert (out / "pass/in/stranger.jpg").read_bytes() == (folder / "stranger.jpg").read_bytes()
    assert rows["stranger.jpg"]["pass_sha256"] == rows["stranger.jpg"]["sha256"]
    assert rows["padded.jpg"]["reason"] == "unchecked_content"
    assert {r["copy_mode"] for r in rows.values()} == {"original"}
    # The same OUT without the option would mix two kinds of copy: refused.
    assert main(command[:-1] + _models(models_dir) + [str(folder)]) == 2
    assert "new --out" in capsys.readouterr().err


def test_gpus_the_cluster_lacks_are_refused_rather_than_waited_for() -> None:
    from batch.engine import RayOptions, actor_gpus
    from batch.errors import BatchError

    has_gpus = actor_gpus(RayOptions()) > 0
    if has_gpus:
        pytest.skip("this Ray has GPUs")
    with pytest.raises(BatchError, match="has 0 GPUs"):
        actor_gpus(RayOptions(num_gpus=1))
    assert actor_gpus(RayOptions(num_gpus=0)) == 0
