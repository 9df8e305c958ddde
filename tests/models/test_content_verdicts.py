"""Issue 19, point 1, end to end: `facegate check` on files whose first image is a
stranger and which also carry an enrolled face (after the end marker, in a thumbnail, a
later frame or page, SubIFD, MPO image, metadata). Each is rejected: as the identity it
shows, naming where, or as `unchecked_content` where the bytes cannot be read. On main
all passed. `facegate batch` gives the same verdicts (tests/loopback/test_batch_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.commands import facegate
from tests.conftest import make_gallery
from tests.content_probes import (
    UNREADABLE_PLACES,
    encode,
    hiding_places,
    probe_files,
)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, identities_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("content")
    gallery = make_gallery(identities_dir, root / "gallery", ["id01", "id02", "id03"])
    result = facegate("index", "build", str(gallery), "--out", str(root / "index"))
    assert result.returncode == 0, result.stderr
    return root / "index"


def check_lines(index: Path, files: dict[str, Path], *options: str) -> dict[str, dict]:
    result = facegate("check", "--index", str(index), *options, *map(str, files.values()))
    assert result.returncode == 0, result.stderr
    by_path = {line["path"]: line for line in map(json.loads, result.stdout.splitlines())}
    return {name: by_path[str(path)] for name, path in files.items()}


def test_check_rejects_every_file_that_carries_an_enrolled_face(
    index: Path, identities_dir: Path, tmp_path: Path
) -> None:
    files = probe_files(tmp_path / "probes", identities_dir)
    lines = check_lines(index, files)
    # The stranger alone passes, and so does a camera JPEG whose thumbnail is itself.
    assert lines["plain"]["verdict"] == "pass" and lines["plain"]["images"] == 1
    assert lines["camera"]["verdict"] == "pass" and lines["camera"]["images"] == 2
    assert lines["camera"]["part"] is None
    for place in hiding_places():
        line = lines[place]
        assert line["verdict"] == "reject", (place, line)
        if place in UNREADABLE_PLACES:
            assert line["reason"] == "unchecked_content", (place, line)
            assert "after the end" in line["error"] and line["identity"] is None
        else:
            assert (line["reason"], line["identity"]) == ("identity_match", "id02"), (place, line)
            assert line["images"] == 2 and line["part"] not in ("image", "frame 1", "page 1")


def test_unchecked_content_wins_over_the_no_face_pass_policy(index: Path, tmp_path: Path) -> None:
    blank = np.full((96, 96, 3), 200, np.uint8)  # no face: passes under --no-face-policy pass
    files = {"blank": tmp_path / "blank.png", "padded": tmp_path / "padded.png"}
    files["blank"].write_bytes(encode(blank, "PNG"))
    files["padded"].write_bytes(encode(blank, "PNG") + b"hidden bytes")
    lines = check_lines(index, files, "--no-face-policy", "pass")
    assert lines["blank"]["verdict"] == "pass"
    assert lines["padded"]["reason"] == "unchecked_content"
