"""The `facegate` CLI contract: exit codes, JSON lines on stdout, messages on stderr.

Most tests call the CLI's `main()` in this process (`tests/commands.py`);
`facegate_process` runs it as a user would, in a real subprocess, for the usage errors and
the entry point itself."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.commands import facegate, facegate_process
from tests.conftest import make_gallery

CHECK_KEYS = {
    "path",
    "verdict",
    "reason",
    "faces",
    "max_similarity",
    "identity",
    "replica_similarity",
}


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory: pytest.TempPathFactory, identities_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("cli")
    gallery = make_gallery(identities_dir, root / "gallery", ["id01", "id02", "id03", "id04"])
    (gallery / "id04" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = facegate("index", "build", str(gallery), "--out", str(root / "index"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identities"] == 4
    assert summary["images_skipped"] == 1 and "broken.jpg" in summary["skipped"][0]["path"]
    assert summary["faces"] >= summary["images"] - summary["images_no_face"]
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr
    return root / "index"


def test_index_build_enrols_bystanders_counts_them_and_skips_a_crowd(
    faces_dir: Path, identities_dir: Path, tmp_path: Path
) -> None:
    """Every face of a training image is enrolled under its folder's identity (bystanders
    are in the training data too); the summary says how many were bystanders and which
    image held more faces than the filter searches (not enrolled)."""
    from bench.scenes import crowd_of

    gallery = make_gallery(identities_dir, tmp_path / "gallery", ["id05"])
    (gallery / "group").mkdir()
    for name in ("two-people.jpg", "many-people.jpg"):
        (gallery / "group" / name).symlink_to(faces_dir / "multi" / name)
    crowd = crowd_of(identities_dir / "id02" / "01.jpg", 32)
    Image.fromarray(crowd).save(gallery / "group" / "crowd.png")
    (gallery / "faceless").mkdir()  # an identity whose only photo shows no face
    Image.new("RGB", (160, 160), (120, 130, 140)).save(gallery / "faceless" / "blank.png")
    result = facegate("index", "build", str(gallery), "--out", str(tmp_path / "index"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identities_without_faces"] == ["faceless"]
    assert "identity faceless has no enrolled face" in result.stderr
    assert "identity id05 has" not in result.stderr and "identity group has" not in result.stderr
    assert summary["images_too_many_faces"] == 1
    assert summary["too_many_faces"] == [str(gallery / "group" / "crowd.png")]
    assert "crowd.png holds more faces than the filter searches" in result.stderr
    with_faces = summary["images"] - summary["images_no_face"] - summary["images_too_many_faces"]
    assert summary["main_faces"] == with_faces
    assert summary["bystander_faces"] == summary["faces"] - with_faces > 0
    assert sorted(summary["with_bystanders"]) == [
        str(gallery / "group" / "many-people.jpg"),
        str(gallery / "group" / "two-people.jpg"),
    ]
    assert summary["images_with_bystanders"] == 2
    manifest = json.loads(facegate("index", "info", str(tmp_path / "index")).stdout)
    assert manifest["counts"]["faces"] == summary["faces"]  # every face enrolled
    assert manifest["counts"]["bystander_faces"] == summary["bystander_faces"]
    assert manifest["counts"]["images_too_many_faces"] == 1


def test_index_info_prints_the_manifest(cli_index: Path) -> None:
    result = facegate("index", "info", str(cli_index))
    assert result.returncode == 0
    manifest = json.loads(result.stdout)
    assert manifest["embedder"]["name"] == "sface" and manifest["embedder"]["dim"] == 128
    assert manifest["counts"]["identities"] == 4 and manifest["index_type"] == "flat"


def test_check_emits_one_line_per_image_in_order_and_survives_a_corrupt_file(
    cli_index: Path, identities_dir: Path, faces_dir: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    images = [
        identities_dir / "id05" / "01.jpg",
        corrupt,
        faces_dir / "multi" / "two-people.jpg",
        identities_dir / "id02" / "01.jpg",
    ]
    result = facegate("check", "--index", str(cli_index), *map(str, images))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    assert all(set(line) >= CHECK_KEYS for line in lines)
    stranger, broken, multi, member = lines
    assert stranger["verdict"] == "pass" and stranger["reason"] is None and stranger["faces"] == 1
    assert isinstance(stranger["max_similarity"], float) and stranger["identity"] is None
    assert broken == {
        **broken,
        "verdict": "reject",
        "reason": "unreadable",
        "faces": 0,
        "max_similarity": None,
        "identity": None,
    }
    assert str(corrupt) in result.stderr
    assert multi["verdict"] == "reject" and multi["identity"] == "id01" and multi["faces"] == 2
    assert member["reason"] == "identity_match" and member["identity"] == "id02"


def test_check_threshold_flag_changes_the_decision(cli_index: Path, identities_dir: Path) -> None:
    image = str(identities_dir / "id05" / "01.jpg")
    base = json.loads(facegate("check", "--index", str(cli_index), image).stdout)
    strict = facegate(
        "check",
        "--index",
        str(cli_index),
        "--threshold",
        f"{base['max_similarity'] - 0.01:.4f}",
        image,
    )
    assert json.loads(strict.stdout)["verdict"] == "reject"


def test_usage_errors_exit_2(cli_index: Path) -> None:
    assert facegate_process("check", "--index", str(cli_index)).returncode == 2
    assert (
        facegate_process("check", "--index", str(cli_index), "--threshold", "3", "x.jpg").returncode
        == 2
    )
    missing = facegate_process("check", "--index", "/nonexistent/index", "x.jpg")
    assert missing.returncode == 2 and "facegate index build" in missing.stderr
    bad_env = facegate_process("index", "info", str(cli_index), env={"FACEGATE_THRESHOLD": "high"})
    assert bad_env.returncode == 2 and "FACEGATE_THRESHOLD" in bad_env.stderr


def test_calibrate_on_held_out_people(
    cli_index: Path, identities_dir: Path, tmp_path: Path
) -> None:
    held_out = make_gallery(identities_dir, tmp_path / "held_out", ["id05", "id06", "id07"])
    result = facegate(
        "calibrate",
        "--index",
        str(cli_index),
        "--non-members",
        str(held_out),
        "--target-false-reject",
        "0.2",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] + report["no_face"] == report["images"] == 7
    q = report["quantiles"]
    assert q["p50"] <= q["p90"] <= q["p95"] <= report["max"]
    # The threshold rejects at most the target share of the calibration set.
    check = facegate(
        "check",
        "--index",
        str(cli_index),
        "--threshold",
        str(report["threshold"]),
        *[str(p) for p in sorted(held_out.rglob("*.jpg"))],
    )
    verdicts = [json.loads(line) for line in check.stdout.splitlines()]
    rejected = sum(v["reason"] == "identity_match" for v in verdicts)
    assert rejected <= 0.2 * report["count"]


def test_demo_index_and_calibration_on_generator_samples(tmp_path: Path) -> None:
    demo = facegate("index", "demo", "--out", str(tmp_path / "demo"), "--identities", "12")
    assert demo.returncode == 0, demo.stderr
    built = json.loads(demo.stdout)
    assert 10 <= built["vectors"] <= 14 and built["seed"] == 1
    index_files = {p: p.read_bytes() for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = facegate(
        "calibrate",
        "--index",
        str(tmp_path / "demo"),
        "--generator-samples",
        "24",
        "--seed",
        "2",
        "--target-false-reject",
        "0.1",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 24 and report["count"] + report["no_face"] == 24
    assert report["quantiles"]["p50"] < report["threshold"] <= report["max"] + 1e-6
    # Unfiltered generator samples are never written: not next to the index, not into the
    # index (without --save it is left byte for byte), not in the working folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "work"]
    after = {p: p.read_bytes() for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    assert after == index_files
    assert list(workdir.iterdir()) == []


def test_check_gives_a_thin_image_a_verdict_and_goes_on(
    cli_index: Path, identities_dir: Path, tmp_path: Path
) -> None:
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1000, 10), (128, 90, 60)).save(thin)
    member = identities_dir / "id02" / "01.jpg"
    result = facegate("check", "--index", str(cli_index), str(thin), str(member))
    assert result.returncode == 0, result.stderr
    thin_line, member_line = [json.loads(line) for line in result.stdout.splitlines()]
    assert thin_line["verdict"] == "reject" and thin_line["reason"] == "unsupported_geometry"
    assert "1000x10" in thin_line["error"]
    assert member_line["reason"] == "identity_match"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("size", ["0", "-1", "many"])
def test_batch_size_must_be_a_positive_integer(
    cli_index: Path, identities_dir: Path, size: str
) -> None:
    image = str(identities_dir / "id05" / "01.jpg")
    result = facegate_process("check", "--index", str(cli_index), "--batch-size", size, image)
    assert result.returncode == 2 and "--batch-size" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_index_build_refuses_a_gallery_without_faces(tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    for identity, shade in (("a", 40), ("b", 200)):
        (gallery / identity).mkdir(parents=True)
        Image.new("RGB", (120, 120), (shade, shade, shade)).save(gallery / identity / "1.png")
    Image.new("RGB", (900, 8), (10, 20, 30)).save(gallery / "b" / "thin.png")
    result = facegate("index", "build", str(gallery), "--out", str(tmp_path / "index"))
    assert result.returncode == 2, result.stderr
    assert "no face" in result.stderr and str(gallery) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "index").exists()


def test_a_saved_calibration_is_what_check_uses_unless_overridden(
    cli_index: Path, identities_dir: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    shutil.copytree(cli_index, index)
    before = json.loads(facegate("index", "info", str(index)).stdout)["fingerprint"]
    held_out = make_gallery(identities_dir, tmp_path / "held_out", ["id05", "id06", "id07"])
    too_few = facegate("calibrate", "--index", str(index), "--non-members", str(held_out))
    assert too_few.returncode == 2 and "too few" in too_few.stderr  # 7 faces for 5 %
    calibrated = facegate(
        "calibrate",
        "--index",
        str(index),
        "--non-members",
        str(held_out),
        "--target-false-reject",
        "0.2",
        "--save",
    )
    assert calibrated.returncode == 0, calibrated.stderr
    threshold = json.loads(calibrated.stdout)["threshold"]
    info = json.loads(facegate("index", "info", str(index), "--verify").stdout)
    assert "calibration.json" in info["files"] and info["fingerprint"] != before
    image = str(identities_dir / "id05" / "01.jpg")
    saved = facegate("check", "--index", str(index), image)
    assert f"identity {threshold} (index calibration)" in saved.stderr
    overridden = facegate("check", "--index", str(index), image, env={"FACEGATE_THRESHOLD": "0.5"})
    assert "identity 0.5 (override)" in overridden.stderr
    uncalibrated = facegate("check", "--index", str(cli_index), image)
    assert "(default)" in uncalibrated.stderr


def test_index_build_over_a_stricter_calibrated_index_is_refused_unless_allowed(
    identities_dir: Path, tmp_path: Path
) -> None:
    """A rebuild starts uncalibrated: over an index calibrated stricter than the defaults
    it silently loosened the threshold any server restarted on it applies."""
    from filter.index import FaissIdentityIndex
    from filter.index_lineage import acknowledgement
    from filter.index_release import index_thresholds

    gallery = make_gallery(identities_dir, tmp_path / "gallery", ["id01", "id02"])
    out = tmp_path / "index"
    assert facegate("index", "build", str(gallery), "--out", str(out)).returncode == 0
    strict = FaissIdentityIndex.load(out).with_calibration({"threshold": 0.3})
    strict.save(out)
    result = facegate("index", "build", str(gallery), "--out", str(out))
    assert result.returncode == 2
    assert "identity threshold 0.3 -> 0.4" in result.stderr and "--allow-looser" in result.stderr
    assert FaissIdentityIndex.load(out).fingerprint == strict.fingerprint  # left alone
    link = tmp_path / "current"
    link.symlink_to(out)
    refused = facegate("index", "build", str(gallery), "--out", str(link))
    assert refused.returncode == 2 and f"facegate index publish NEW {link}" in refused.stderr

    allowed = facegate("index", "build", str(gallery), "--out", str(out), "--allow-looser")
    assert allowed.returncode == 0, allowed.stderr
    assert "replaced by a looser index (identity threshold 0.3 -> 0.4)" in allowed.stderr
    rebuilt = FaissIdentityIndex.load(out)
    assert index_thresholds(rebuilt).identity == 0.4
    ack = acknowledgement(rebuilt.manifest)
    assert ack is not None and ack["by"] == "index build --allow-looser"
    assert ack["replaces_fingerprint"] == strict.fingerprint
    again = facegate("index", "build", str(gallery), "--out", str(out))  # defaults -> defaults
    assert again.returncode == 0, again.stderr


def test_index_build_enrols_every_face_below_each_identity_and_names_what_it_leaves(
    identities_dir: Path, tmp_path: Path
) -> None:
    """Enrolment read only the first frame of images directly inside each identity folder
    with a listed suffix: a photo in person/2019/, a .jfif, a file without a suffix and
    the second page of a TIFF were dropped with nothing said, and their people passed."""
    from filter.index import FaissIdentityIndex

    gallery = tmp_path / "gallery"
    for name in ("alice", "bob/2019", "carol", "dave", "erin"):
        (gallery / name).mkdir(parents=True)
    photo = {i: identities_dir / i / "01.jpg" for i in ("id01", "id02", "id03", "id05", "id06")}
    (gallery / "alice" / "01.jpg").symlink_to(photo["id01"])
    (gallery / "bob" / "2019" / "01.jpg").symlink_to(photo["id02"])  # in a subfolder
    (gallery / "carol" / "01.jfif").symlink_to(photo["id03"])  # a suffix not listed
    (gallery / "carol" / "caption.txt").write_text("carol at the beach")
    pages = [Image.open(photo[i]).convert("RGB") for i in ("id01", "id05")]
    pages[0].save(gallery / "dave" / "album.tif", save_all=True, append_images=pages[1:])
    (gallery / "erin" / "portrait").write_bytes(photo["id06"].read_bytes())  # no suffix
    (gallery / "stray.jpg").symlink_to(photo["id01"])  # beside the identity folders
    (gallery / "frank").mkdir()  # an identity with nothing in it

    result = facegate("index", "build", str(gallery), "--out", str(tmp_path / "index"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    rows = FaissIdentityIndex.load(tmp_path / "index")
    sources = set(rows.faces.sources)
    assert {"bob/2019/01.jpg", "carol/01.jfif", "erin/portrait"} <= sources
    assert {"dave/album.tif", "dave/album.tif#frame=2"} <= sources  # both pages
    assert set(rows.faces.identities) == {"alice", "bob", "carol", "dave", "erin"}
    assert summary["identities_without_faces"] == ["frank"]
    assert "identity frank has no enrolled face" in result.stderr
    ignored = {Path(item["path"]).name: item["why"] for item in summary["ignored"]}
    assert ignored == {
        "stray.jpg": "not in an identity folder (GALLERY/<identity>/...)",
        "caption.txt": "not an image",
    }
    assert f"{gallery / 'stray.jpg'} is not in an identity folder" in result.stderr
    assert "1 files under identity folders are not images" in result.stderr

    # Bob's and the second page's person are held back now.
    for probe in (photo["id02"], photo["id05"]):
        checked = facegate("check", "--index", str(tmp_path / "index"), str(probe))
        assert json.loads(checked.stdout)["verdict"] == "reject", checked.stdout
