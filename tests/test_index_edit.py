"""Enrolment without a rebuild: `index add` / `index remove` keep faces and replicas in
step, keep the calibration only while it holds, and publish atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from filter.decide import DecisionThresholds, NoFacePolicy
from filter.errors import FilterError
from filter.faces import DetectorSettings
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.index_edit import add_gallery, remove_identities
from filter.index_release import publish, publish_folder
from filter.runtime import load_index_for
from tests.conftest import make_gallery
from tests.test_cli import facegate

CALIBRATION = {"threshold": 0.5, "replica_threshold": 0.95, "target_false_reject": 0.05}


@pytest.fixture(scope="module")
def base_index(
    tmp_path_factory: pytest.TempPathFactory,
    identities_dir: Path,
    pipeline: FaceEmbeddingPipeline,
) -> Path:
    root = tmp_path_factory.mktemp("edit")
    gallery = make_gallery(identities_dir, root / "gallery", ["id01", "id02", "id03"])
    index, _ = build_gallery_index(
        gallery, pipeline, detector_settings=DetectorSettings().as_dict()
    )
    out = root / "index"
    index.with_calibration(CALIBRATION).save(out)
    return out


def _rows(index: FaissIdentityIndex) -> tuple[set[str], set[str]]:
    assert index.replicas is not None
    return set(index.faces.identities), set(index.replicas.identities)


def _best_match(index: FaissIdentityIndex, pipeline: FaceEmbeddingPipeline, photo: Path) -> str:
    checker = IdentityFilter(pipeline, index, DecisionThresholds(0.40, 0.99), NoFacePolicy.REJECT)
    verdict = checker.check([decode_image(photo)])[0]
    return f"{verdict.verdict}:{verdict.identity}"


def test_add_enrols_faces_and_replicas_and_drops_the_calibration(
    base_index: Path, identities_dir: Path, pipeline: FaceEmbeddingPipeline, tmp_path: Path
) -> None:
    before = load_index_for(pipeline, base_index)
    photo = identities_dir / "id04" / "01.jpg"
    assert not _best_match(before, pipeline, photo).endswith("id04")

    gallery = make_gallery(identities_dir, tmp_path / "optout", ["id04"])
    edited, report = add_gallery(before, pipeline, gallery)
    assert report.identities_new == ["id04"] and report.identities_extended == []
    assert report.calibration.startswith("dropped")
    assert before.replicas is not None and edited.replicas is not None
    images = len(list((identities_dir / "id04").glob("*.jpg")))
    assert edited.replicas.count == before.replicas.count + images  # one row per image
    assert edited.faces.count > before.faces.count
    assert _rows(edited) == ({"id01", "id02", "id03", "id04"},) * 2
    assert edited.calibration is None

    out = tmp_path / "added"
    publish(edited, out)
    reloaded = load_index_for(pipeline, out)  # integrity, detector, self-test all hold
    assert reloaded.fingerprint == edited.fingerprint != before.fingerprint
    assert _best_match(reloaded, pipeline, photo) == "reject:id04"
    assert reloaded.manifest["edits"][-1]["op"] == "add"
    assert reloaded.manifest["edits"][-1]["from_fingerprint"] == before.fingerprint
    # The old rows are untouched: an enrolled photo of id01 still matches id01.
    assert _best_match(reloaded, pipeline, identities_dir / "id01" / "01.jpg") == "reject:id01"


def test_remove_drops_every_row_of_the_identity_and_keeps_the_calibration(
    base_index: Path, identities_dir: Path, pipeline: FaceEmbeddingPipeline, tmp_path: Path
) -> None:
    before = FaissIdentityIndex.load(base_index)
    edited, report = remove_identities(before, ["id02"])
    assert report.identities_removed == ["id02"]
    assert _rows(edited) == ({"id01", "id03"},) * 2
    assert before.replicas is not None and edited.replicas is not None
    assert edited.replicas.count == before.replicas.count - sum(
        1 for i in before.replicas.identities if i == "id02"
    )
    assert edited.calibration == CALIBRATION and report.calibration.startswith("kept")
    out = tmp_path / "removed"
    publish(edited, out)
    reloaded = load_index_for(pipeline, out)
    assert reloaded.calibration == CALIBRATION
    assert not _best_match(reloaded, pipeline, identities_dir / "id02" / "01.jpg").endswith("id02")


def test_remove_refuses_unknown_identities_and_an_empty_result(base_index: Path) -> None:
    index = FaissIdentityIndex.load(base_index)
    with pytest.raises(FilterError, match="not enrolled"):
        remove_identities(index, ["nobody"])
    with pytest.raises(FilterError, match="empty index"):
        remove_identities(index, ["id01", "id02", "id03"])


def test_publish_through_a_symlink_flips_it_and_keeps_the_old_release(
    base_index: Path, tmp_path: Path
) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    first = releases / "index-v1"
    FaissIdentityIndex.load(base_index).save(first)
    link = tmp_path / "current"
    link.symlink_to(os.path.relpath(first, tmp_path))

    edited, _ = remove_identities(FaissIdentityIndex.load(link), ["id03"])
    written = publish(edited, link)
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == written.resolve() != first.resolve()
    assert written.parent == releases and written.name.startswith("index-v1.")
    assert FaissIdentityIndex.load(link).fingerprint == edited.fingerprint
    assert FaissIdentityIndex.load(first).fingerprint != edited.fingerprint  # rollback target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".current")]


def test_cli_remove_then_info(base_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-removed"
    result = facegate("index", "remove", str(base_index), "--identity", "id03", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identities_removed"] == ["id03"]
    assert summary["face_rows"]["after"] < summary["face_rows"]["before"]
    info = json.loads(facegate("index", "info", str(out)).stdout)
    assert info["fingerprint"] == summary["fingerprint_after"]
    assert info["counts"]["identities"] == 2
    unknown = facegate("index", "remove", str(base_index), "--identity", "id99")
    assert unknown.returncode == 2 and "not enrolled" in unknown.stderr
    assert FaissIdentityIndex.load(base_index).identity_count == 3  # --out left it alone


def test_publish_folder_copies_verifies_and_flips(base_index: Path, tmp_path: Path) -> None:
    link = tmp_path / "index" / "current"
    first = publish_folder(base_index, link, name="v1")
    assert first.parent == tmp_path / "index" / "releases" and first.name.startswith("v1.")
    assert (
        FaissIdentityIndex.load(link).fingerprint == FaissIdentityIndex.load(base_index).fingerprint
    )
    broken = shutil.copytree(base_index, tmp_path / "broken")
    (broken / "labels.json").write_text("[]")
    with pytest.raises(FilterError):
        publish_folder(broken, link)
    assert link.resolve() == first.resolve()  # a refused source leaves the link alone
    result = facegate("index", "publish", str(tmp_path / "broken"), str(link))
    assert result.returncode == 2 and "labels.json" in result.stderr
    assert link.resolve() == first.resolve()
