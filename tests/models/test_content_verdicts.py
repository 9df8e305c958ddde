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

from tests.colour_probes import alpha_drawn, dark_with_gamma, icc_stretched, side_by_side
from tests.commands import facegate
from tests.conftest import make_gallery
from tests.content_probes import (
    UNREADABLE_PLACES,
    encode,
    hiding_places,
    load,
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


def test_check_rejects_an_enrolled_face_a_viewer_shows_and_the_raw_pixels_hide(
    index: Path, identities_dir: Path, tmp_path: Path
) -> None:
    """Beside a stranger: an enrolled face drawn in the alpha channel alone (blank over
    white), squeezed into a band of values that an ICC profile or PNG gamma stretches back,
    or turned on its side or upside down (MTCNN finds faces near upright only). Each passed
    before; the stranger alone passes."""
    shown = load(identities_dir / "id05" / "01.jpg", (200, 200))
    hidden = load(identities_dir / "id02" / "02.jpg", (200, 200))
    builders = {
        "alpha": lambda: alpha_drawn(shown, hidden),
        "icc png": lambda: icc_stretched(shown, hidden, "PNG"),
        "icc jpeg": lambda: icc_stretched(shown, hidden, "JPEG"),
        "gamma": lambda: dark_with_gamma(shown, hidden),
        "on its side": lambda: encode(side_by_side(shown, np.rot90(hidden)), "PNG"),
        "upside down": lambda: encode(side_by_side(shown, np.rot90(hidden, 2)), "PNG"),
        "stranger": lambda: encode(shown, "PNG"),
    }
    files = {}
    for name, build in builders.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.png"
        files[name].write_bytes(build())
    lines = check_lines(index, files)
    assert lines.pop("stranger")["verdict"] == "pass"
    for name, line in lines.items():
        assert (line["verdict"], line["reason"], line["identity"]) == (
            "reject",
            "identity_match",
            "id02",
        ), (name, line)
