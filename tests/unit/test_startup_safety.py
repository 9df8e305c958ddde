"""Startup is as safe as a reload (review findings 3, 5, 6): an index whose calibration is
looser than the defaults needs an acknowledgement covering that step; unauthenticated
metrics beyond loopback need an explicit opt-in; every setting weaker than the default
(no-face pass, the fast path on an unmeasured generator, a looser explicit threshold) is
logged as a WARNING. Without models: the index is a stand-in with what the rules read."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from filter.decide import DecisionThresholds
from filter.index_lineage import acknowledge
from filter.thresholds import resolve_thresholds
from service.config import Settings
from service.errors import StartupError
from service.metrics import ServiceMetrics
from service.security import preflight
from service.server import FacegateServer, LoadedService
from service.threshold_notices import override_warnings, startup_looser_warning
from tests.conftest import write_seed_key


class Index:
    """What the threshold rules read of an index."""

    def __init__(
        self,
        calibration: dict[str, float] | None = None,
        manifest: dict[str, Any] | None = None,
        has_replicas: bool = True,
    ) -> None:
        self.calibration = calibration
        self.manifest = manifest if manifest is not None else {}
        self.has_replicas = has_replicas
        self.fingerprint = "f00d"


def _warning(index: Index, **overrides: float) -> str:
    thresholds = resolve_thresholds(
        index,  # type: ignore[arg-type]
        overrides.get("identity"),
        overrides.get("replica"),
    )
    return startup_looser_warning(index, thresholds)  # type: ignore[arg-type]


UNCOVERED = "no acknowledgement in it covers that step"


def _acknowledged(before: tuple[float, float | None], after: tuple[float, float | None]) -> dict:
    manifest: dict[str, Any] = {}
    acknowledge(
        manifest,
        by="calibrate --save --allow-looser",
        replaces=None,
        before=DecisionThresholds(*before),
        after=DecisionThresholds(*after),
    )
    return manifest


def test_an_index_calibrated_looser_than_the_defaults_without_acknowledgement_is_warned() -> None:
    warning = _warning(Index({"threshold": 0.56, "replica_threshold": 0.9}))
    assert "identity threshold 0.4 -> 0.56" in warning and UNCOVERED in warning
    # The same ways out as a refused reload names.
    assert "index publish --allow-looser" in warning
    assert "calibrate --save --allow-looser" in warning
    replica = _warning(Index({"threshold": 0.4, "replica_threshold": 0.95}))
    assert "replica threshold 0.9 -> 0.95" in replica and UNCOVERED in replica


def test_an_acknowledgement_covering_the_step_from_the_defaults_is_named() -> None:
    # What `make demo-index` makes: calibrate --save --allow-looser on a fresh index.
    manifest = _acknowledged((0.4, 0.9), (0.56, 0.9))
    warning = _warning(Index({"threshold": 0.56}, manifest))
    assert "looser than the defaults" in warning and "acknowledged by" in warning
    assert UNCOVERED not in warning


@pytest.mark.parametrize(
    ("manifest", "calibration"),
    [
        # Given against a looser predecessor: does not cover a step from the defaults.
        (_acknowledged((0.5, 0.9), (0.56, 0.9)), {"threshold": 0.56}),
        # Covers less than the index brings.
        (_acknowledged((0.4, 0.9), (0.5, 0.9)), {"threshold": 0.56}),
        # Says nothing about what it covers.
        ({"looser_acknowledged": {"by": "x"}}, {"threshold": 0.56}),
    ],
)
def test_an_acknowledgement_that_does_not_cover_the_step_is_said_so(
    manifest: dict[str, Any], calibration: dict[str, float]
) -> None:
    assert UNCOVERED in _warning(Index(calibration, manifest))


def test_defaults_stricter_calibrations_and_explicit_overrides_are_not_warned_here() -> None:
    assert _warning(Index()) == ""
    assert _warning(Index({"threshold": 0.3, "replica_threshold": 0.85})) == ""
    assert UNCOVERED in _warning(Index({"threshold": 0.56}, has_replicas=False))
    # The operator's explicit choice (warned about, see below) is not the index's.
    assert _warning(Index({"threshold": 0.56}), identity=0.3) == ""
    assert _warning(Index(), identity=0.7, replica=0.99) == ""


def test_a_looser_explicit_threshold_is_a_warning() -> None:
    index = Index({"threshold": 0.3, "replica_threshold": 0.85})
    loose = resolve_thresholds(index, 0.35, 0.95)  # type: ignore[arg-type]
    warnings = override_warnings(index, loose)  # type: ignore[arg-type]
    assert len(warnings) == 2
    assert "FACEGATE_THRESHOLD=0.35 is looser than the index's own 0.3" in warnings[0]
    assert "the default" not in warnings[0]  # 0.35 is stricter than the default 0.40
    assert "FACEGATE_REPLICA_THRESHOLD=0.95" in warnings[1]
    strict = resolve_thresholds(index, 0.2, 0.8)  # type: ignore[arg-type]
    assert override_warnings(index, strict) == []  # type: ignore[arg-type]
    calibrated = resolve_thresholds(index)  # type: ignore[arg-type]
    assert override_warnings(index, calibrated) == []  # type: ignore[arg-type]


# --- weaker settings, before anything loads ---------------------------------------------


@pytest.fixture()
def index_stub(tmp_path: Path) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder


def _settings(index: Path, tmp_path: Path, **values: object) -> Settings:
    base: dict[str, object] = {
        "index_path": index,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "audit_log": "none",
        "tls_cert": None,
        "max_concurrent_per_peer": 4,
        "seed_key_file": write_seed_key(tmp_path),
    }
    return Settings(**{**base, **values})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"no_face_policy": "pass"}, "FACEGATE_NO_FACE_POLICY=pass"),
        (
            {"generated_fast_path": "on", "generator": "torchscript", "generator_path": "g.pt"},
            "FACEGATE_GENERATED_FAST_PATH=on",
        ),
    ],
)
def test_weaker_filter_policies_are_warnings(
    index_stub: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    values: dict[str, object],
    expected: str,
) -> None:
    with caplog.at_level(logging.INFO):
        preflight(_settings(index_stub, tmp_path, **values))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(expected in message for message in warned), caplog.text


def test_the_fast_path_is_a_warning_on_the_embedded_generator_too(
    index_stub: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It was verified there once; its boxes then left enrolled outputs below the threshold
    against their own enrolment (tests/models/test_leak_proof.py), so no generator is
    exempt. `auto` keeps the full pyramid and says nothing."""
    with caplog.at_level(logging.WARNING):
        preflight(_settings(index_stub, tmp_path, generated_fast_path="on"))
    assert "FACEGATE_GENERATED_FAST_PATH=on for generator dcgan-digiface" in caplog.text
    assert "against its own enrolment" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        preflight(_settings(index_stub, tmp_path, generated_fast_path="auto"))
    assert "FACEGATE_GENERATED_FAST_PATH" not in caplog.text


class Loaded(Exception):
    """The loader was reached: every check before loading passed."""


def _never_load(settings: Settings, metrics: ServiceMetrics) -> LoadedService:
    raise Loaded


def _start(settings: Settings) -> None:
    server = FacegateServer(settings, _never_load)

    async def main() -> None:
        try:
            await server.start()
        finally:
            server.metrics.stop_serving()

    asyncio.run(main())


def test_unauthenticated_metrics_beyond_loopback_are_refused_before_loading(
    index_stub: Path, tmp_path: Path
) -> None:
    with pytest.raises(StartupError, match="FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true"):
        _start(_settings(index_stub, tmp_path, metrics_host="0.0.0.0"))


def test_unauthenticated_metrics_beyond_loopback_are_an_opt_in_logged_as_a_warning(
    index_stub: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(
        index_stub, tmp_path, metrics_host="0.0.0.0", metrics_allow_unauthenticated=True
    )
    with caplog.at_level(logging.WARNING), pytest.raises(Loaded):
        _start(settings)
    assert "FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true" in caplog.text
    assert "accept any scraper" in caplog.text


def test_a_bearer_token_needs_no_opt_in(index_stub: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    with pytest.raises(Loaded):
        _start(_settings(index_stub, tmp_path, metrics_host="0.0.0.0",
                         metrics_bearer_token_file=token))  # fmt: skip
