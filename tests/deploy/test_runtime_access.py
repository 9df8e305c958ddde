"""The files the deployments mount can be read by the users their containers run as:
the image's models by its user 10001, compose's bind-mounted secrets and index by
facegate (10001), Prometheus (65534) and Grafana (472), through a group compose adds.
And what operators are told to run works on the image (no /bin/kill in python:*-slim);
the k8s scrape's job label is the one the alerts match."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
GID_VARIABLE = "COMPOSE_SECRETS_GID"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_the_image_makes_its_models_readable_by_the_runtime_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    fetch = next(line for line in text.splitlines() if "facegate models fetch" in line)
    assert "/opt/facegate/models" in fetch
    # Whatever umask the fetch ran under, the build opens the folder to everyone (read
    # only: the runtime user must not be able to rewrite the weights it verifies).
    assert re.search(r"chmod -R a\+rX,go-w /opt/facegate/models", text), text
    copy = next(line for line in text.splitlines() if "/opt/facegate/models /opt" in line)
    assert copy.startswith("COPY --from=build --chown=root:root"), copy


def test_every_compose_service_that_mounts_var_reads_it_through_the_secrets_group() -> None:
    compose = _compose()
    secrets = compose["secrets"]
    assert all(s["file"].startswith("../var/") for s in secrets.values())
    mounting = set()
    for name, service in compose["services"].items():
        from_var = [v for v in service.get("volumes", []) if v.startswith("../var/")]
        if service.get("secrets") or from_var:
            mounting.add(name)
            (group,) = service["group_add"]
            assert group.startswith("${" + GID_VARIABLE + ":?"), (name, group)
    assert mounting == {"facegate", "prometheus", "grafana"}


def _make_compose_files(var: Path) -> None:
    previous = os.umask(0o077)  # as `make demo-index` and the CLI write them
    try:
        (var / "index").mkdir(parents=True)
        (var / "index" / "manifest.json").write_text("{}")
        (var / "c2pa").mkdir()
        for name in ("seed.key", "metrics.token", "grafana-admin.password"):
            (var / name).write_text("x" * 32)
        for name in ("chain.pem", "signer.key", "root.key"):
            (var / "c2pa" / name).write_text("pem")
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_compose_permissions_opens_what_compose_mounts_to_the_group_only(
    tmp_path: Path,
) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is needed")
    var = tmp_path / "var"
    _make_compose_files(var)
    result = subprocess.run(
        [make, "-s", "compose-permissions", f"COMPOSE_VAR={var}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = _compose()
    mounted = [var / s["file"].removeprefix("../var/") for s in compose["secrets"].values()]
    mounted.append(var / "index" / "manifest.json")
    for path in mounted:
        assert _mode(path) == 0o640, path
    assert _mode(var / "index") == 0o750
    assert _mode(var / "c2pa" / "root.key") == 0o600  # not mounted: stays owner-only
    assert _mode(var) == 0o700  # nobody else on this host gets in
    env = (var / "compose.env").read_text().split()
    assert env == [f"{GID_VARIABLE}={os.getgid()}"]
    docs = (REPO / "docs/operations.md").read_text()
    assert "--env-file var/compose.env" in docs and GID_VARIABLE in docs


def test_the_pod_monitor_sets_the_job_label_the_alerts_match() -> None:
    monitor = yaml.safe_load((DEPLOY / "k8s/base/podmonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert {"action": "replace", "targetLabel": "job", "replacement": "facegate"} in endpoint[
        "relabelings"
    ]
    rules = (DEPLOY / "prometheus/tests/target_down_test.yml").read_text()
    assert 'job="facegate/facegate"' in rules  # the operator's own form is tested too


def test_promtool_rule_tests_pass() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make tools`)")
    tests = sorted(str(p) for p in (DEPLOY / "prometheus/tests").glob("*.yml"))
    result = subprocess.run(
        [promtool, "test", "rules", *tests], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_documented_sighup_needs_no_kill_binary() -> None:
    docs = (REPO / "docs/operations.md").read_text()
    assert "-- kill -HUP 1" not in docs
    assert "os.kill(1, signal.SIGHUP)" in docs
