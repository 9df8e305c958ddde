"""Fetched model weights are public: the container's runtime user (not the user who ran
`facegate models fetch`, whose CLI writes under umask 077) must be able to read them."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filter import models
from filter.models import DCGAN_DIGIFACE, ModelSpec, atomic_write_bytes, fetch_model

PAYLOAD = b"public weights"
SPEC = ModelSpec(
    key="fake",
    filename="fake.tar",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    wheel_requirement="gan-face-generate==1.1.1",
    wheel_member=DCGAN_DIGIFACE.wheel_member,
    description="a stand-in",
)


@pytest.fixture()
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)  # what the CLI runs under
    try:
        yield
    finally:
        os.umask(previous)


def _fake_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    dest = Path(cmd[cmd.index("--dest") + 1])
    with zipfile.ZipFile(dest / "gan_face_generate-1.1.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(SPEC.wheel_member, PAYLOAD)
    return subprocess.CompletedProcess(cmd, 0, "", "")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fetched_models_and_their_folders_are_world_readable_under_umask_077(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_077: None
) -> None:
    monkeypatch.setattr(models.subprocess, "run", _fake_pip)
    target = fetch_model(SPEC, tmp_path / "opt" / "facegate" / "models")
    assert target.read_bytes() == PAYLOAD
    assert _mode(target) == 0o644
    # Every folder the fetch made, down from the first missing one, lets others in.
    for folder in (tmp_path / "opt", tmp_path / "opt/facegate", target.parent):
        assert _mode(folder) == 0o755, folder


def test_an_atomic_write_under_umask_077_is_group_and_other_readable(
    tmp_path: Path, umask_077: None
) -> None:
    target = tmp_path / "weights.onnx"
    atomic_write_bytes(target, PAYLOAD)
    assert _mode(target) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_an_existing_models_folder_is_left_as_the_operator_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_077: None
) -> None:
    monkeypatch.setattr(models.subprocess, "run", _fake_pip)
    folder = tmp_path / "mine"
    folder.mkdir()
    folder.chmod(0o750)
    target = fetch_model(SPEC, folder)
    assert _mode(folder) == 0o750 and _mode(target) == 0o644


def test_a_verified_file_fetched_owner_only_by_an_earlier_release_is_opened_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_077: None
) -> None:
    monkeypatch.setattr(models.subprocess, "run", _fake_pip)
    (tmp_path / SPEC.filename).write_bytes(PAYLOAD)
    (tmp_path / SPEC.filename).chmod(0o600)
    assert _mode(fetch_model(SPEC, tmp_path)) == 0o644
