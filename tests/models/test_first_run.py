"""What a new operator meets first: the command list, typo warnings before any startup
check, and model files found from any working folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **env},
        timeout=300,
        check=False,
    )


def test_facegate_alone_lists_its_commands(tmp_path: Path) -> None:
    result = run([], tmp_path, {})
    assert result.returncode == 2
    for command in ("models", "index", "check", "calibrate", "serve", "generate"):
        assert f"    {command}" in result.stdout, result.stdout


def test_a_mistyped_name_is_warned_about_before_the_startup_check(tmp_path: Path) -> None:
    result = run(["serve"], tmp_path, {"FACEGATE_INDEX_PAHT": str(tmp_path / "index")})
    assert result.returncode == 2
    log = result.stderr
    warning = log.find("FACEGATE_INDEX_PAHT matches no setting")
    failure = log.find("no identity index at var/index")
    assert 0 <= warning < failure, log
    assert "did you mean FACEGATE_INDEX_PATH?" in log


def test_a_typo_is_also_named_when_the_configuration_is_invalid(tmp_path: Path) -> None:
    result = run(
        ["index", "info", "x"], tmp_path, {"FACEGATE_THRESHHOLD": "0.5", "FACEGATE_DEVICE": "tpu"}
    )
    assert result.returncode == 2
    assert "did you mean FACEGATE_THRESHOLD?" in result.stderr
    assert "FACEGATE_DEVICE" in result.stderr


def test_check_finds_the_models_from_another_folder(
    tmp_path: Path, full_index: Path, identities_dir: Path
) -> None:
    photo = identities_dir / "id01" / "01.jpg"
    result = run(["check", "--index", str(full_index), str(photo)], tmp_path, {})
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    assert line["verdict"] == "reject" and line["identity"] == "id01"


def test_default_models_dir_does_not_depend_on_the_working_folder(tmp_path: Path) -> None:
    from filter.models import default_models_dir, user_models_dir

    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert default_models_dir() == REPO / "models"
    finally:
        os.chdir(here)
    assert user_models_dir().parts[-2:] == ("facegate", "models")
