import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, load_settings, unknown_env_names
from tests.conftest import REPO


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FACEGATE_"):
            monkeypatch.delenv(key)
    settings = load_settings()
    # No threshold set: the server takes the index's saved calibration, else the default.
    assert settings.threshold is None and settings.replica_threshold is None
    assert settings.generated_fast_path == "auto"
    assert settings.no_face_policy == "reject" and settings.max_attempts == 8
    assert settings.max_count == 64 and settings.generator == "dcgan-digiface"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEGATE_THRESHOLD", "0.55")
    monkeypatch.setenv("FACEGATE_NO_FACE_POLICY", "pass")
    monkeypatch.setenv("FACEGATE_DEVICE", "cpu")
    settings = load_settings()
    assert settings.threshold == 0.55 and settings.no_face_policy == "pass"
    assert settings.effective()["threshold"] == "0.55"


@pytest.mark.parametrize(
    ("value", "mode"), [("true", "auto"), ("0", "off"), ("auto", "auto"), ("ON", "on")]
)
def test_fast_path_accepts_booleans(monkeypatch: pytest.MonkeyPatch, value: str, mode: str) -> None:
    monkeypatch.setenv("FACEGATE_GENERATED_FAST_PATH", value)
    assert load_settings().generated_fast_path == mode


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FACEGATE_THRESHOLD", "1.5"),
        ("FACEGATE_REPLICA_THRESHOLD", "-2"),
        ("FACEGATE_GENERATED_FAST_PATH", "sometimes"),
        ("FACEGATE_DEVICE", "tpu"),
        ("FACEGATE_MAX_COUNT", "0"),
        ("FACEGATE_NO_FACE_POLICY", "maybe"),
        ("FACEGATE_GRPC_PORT", "http"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_combinations_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEGATE_GENERATOR", "torchscript")
    with pytest.raises(ConfigError, match="FACEGATE_GENERATOR_PATH"):
        load_settings()


def test_mistyped_names_are_reported() -> None:
    env = {"FACEGATE_THRESHHOLD": "0.3", "FACEGATE_THRESHOLD": "0.4", "FACEGATE_TEST_FACES": "x"}
    assert unknown_env_names(env) == ["FACEGATE_THRESHHOLD"]


def test_checked_in_grpc_code_matches_the_proto(tmp_path: Path) -> None:
    """`make protos` output is committed; this fails when protos/ changed without it."""
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Iservice/proto={REPO / 'protos'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            "service/proto/facegate/v1/generation.proto",
        ],
        cwd=REPO,
        check=True,
    )
    for name in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"):
        generated = (out / "service/proto/facegate/v1" / name).read_text()
        committed = (REPO / "service/proto/facegate/v1" / name).read_text()
        assert generated == committed, f"{name} is stale: run `make protos`"
