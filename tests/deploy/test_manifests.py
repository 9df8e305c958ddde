"""Deployment artefacts checked by real tools: kubernetes schemas, hadolint; the overlays
and compose name files that exist. A real Prometheus scraping a real server with the
shipped config and rules is in tests/loopback/test_prometheus.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S_BASE = DEPLOY / "k8s" / "base"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in _docs(K8S_BASE / name):
            resources[doc["kind"]] = doc
    return resources


def test_kubernetes_resources_validate_against_the_api_schemas(
    k8s: dict[str, dict[str, Any]],
) -> None:
    for kind in ("ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"):
        kubernetes_validate.validate(k8s[kind], "1.37.0", strict=True)
    monitor = k8s["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_deployment_matches_the_service_config(k8s: dict[str, dict[str, Any]]) -> None:
    config = k8s["ConfigMap"]["data"]
    known = {f"FACEGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    settings = Settings(**{k.removeprefix("FACEGATE_").lower(): v for k, v in config.items()})
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == "facegate.v1.GenerationService"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > settings.grace_seconds + pre_stop
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/index"]["readOnly"] is True
    assert str(settings.index_path).startswith("/index/")
    assert pod["securityContext"]["runAsNonRoot"] is True
    service_ports = {p["targetPort"] for p in k8s["Service"]["spec"]["ports"]}
    assert service_ports <= set(ports)
    assert k8s["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] in ports
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == k8s["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "facegate_inflight_requests"


def test_overlays_reference_existing_files_and_the_gpu_overlay_asks_for_a_gpu() -> None:
    for overlay in ("cpu", "gpu"):
        kustomization = yaml.safe_load(
            (DEPLOY / "k8s/overlays" / overlay / "kustomization.yaml").read_text()
        )
        for resource in kustomization["resources"]:
            assert (DEPLOY / "k8s/overlays" / overlay / resource).resolve().is_dir()
        for patch in kustomization.get("patches", []):
            if "path" in patch:
                assert (DEPLOY / "k8s/overlays" / overlay / patch["path"]).is_file()
    gpu = yaml.safe_load((DEPLOY / "k8s/overlays/gpu/gpu-patch.yaml").read_text())
    limits = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_dockerfile_passes_hadolint_and_copies_what_exists() -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv/bin/hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    assert 'ENTRYPOINT ["facegate"]' in text and 'CMD ["serve"]' in text
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'facegate = "service.cli:main"' in scripts
    assert re.search(r"^USER 10001", text, re.M)
    assert "EXPOSE 50051 9095" in text
    assert "facegate models fetch" in text  # models baked in at build time
    assert "service.healthcheck" in text and (REPO / "service/healthcheck.py").is_file()
    assert "ARG VARIANT" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "models", "var", "tests"} <= set(ignored)


def test_compose_mounts_existing_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"facegate", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("../var"):
                assert (DEPLOY / source).exists(), source
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
