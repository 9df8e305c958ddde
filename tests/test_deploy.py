"""Deployment artefacts checked by real tools: kubernetes schemas, hadolint, and a real
Prometheus scraping a real facegate server with the shipped config and rules."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import REPO, TEST_SEED_KEY
from tests.servers import InProcessServer, free_port

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


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/facegate.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("rejection", "similarity", "latency", "attempts", "throughput", "in-flight"):
        assert needed in titles
    assert any(p["type"] == "heatmap" for p in dashboard["panels"])
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture()
def prometheus_against(tmp_path: Path) -> Iterator[Any]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the prometheus binary is missing: run `make tools` (Debian package prometheus)"
        )
    started: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int, token_file: Path) -> str:
        config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        scrape = config["scrape_configs"][0]
        scrape["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
        # The shipped scrape config authenticates with the bearer token; here the token
        # is the test's file instead of the compose secret.
        assert scrape["authorization"]["type"] == "Bearer"
        scrape["authorization"]["credentials_file"] = str(token_file)
        rule_files = []
        for name in config["rule_files"]:
            rules = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
            for group in rules["groups"]:
                group["interval"] = "1s"  # shipped groups evaluate every 30s
            target = tmp_path / Path(name).name
            target.write_text(yaml.safe_dump(rules))
            rule_files.append(str(target))
        config["rule_files"] = rule_files
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        started.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_real_prometheus_scrapes_counters_and_evaluates_rules(
    prometheus_against: Any, tmp_path: Path
) -> None:
    from tests.servers import settings_for  # the same server settings as the API tests

    index = tmp_path / "index"
    from filter.assembly import build_embedding_pipeline
    from service.demo import build_demo_index
    from service.generators import load_dcgan_digiface

    build_demo_index(
        load_dcgan_digiface(REPO / "models"),
        build_embedding_pipeline("sface", REPO / "models", "cpu"),
        identities=20,
        seed=1,
        seed_key=TEST_SEED_KEY,
    ).save(index)
    token = tmp_path / "metrics.token"
    token.write_text("prometheus-scrape-token-0123456789\n")
    server = InProcessServer(settings_for(index, tmp_path, metrics_bearer_token_file=token))
    try:
        base = prometheus_against(server.server.metrics_port, token)
        deadline = time.monotonic() + 240  # generous: the loop ends as soon as all are numbers
        values: dict[str, float] = {}
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            while time.monotonic() < deadline:
                stub.Generate(pb.GenerateRequest(count=4, seed=1), timeout=60)  # seed 1 resamples
                for query in (
                    "facegate_candidates_total",
                    "facegate:candidates:rate5m",
                    "facegate:candidate_reject_ratio:rate5m",
                    "facegate:attempts_per_image:mean5m",
                    'up{job="facegate"}',
                ):
                    result = _api(base, "/api/v1/query", query=f"sum({query})")["data"]["result"]
                    if result:
                        values[query] = float(result[0]["value"][1])
                # A ratio is NaN (0/0) until its window holds samples, and 0 while a rejected
                # series has only one sample in it (rate() needs two): wait until every
                # queried series is there, finite, and has seen this test's rejections.
                finite = len(values) == 5 and all(math.isfinite(v) for v in values.values())
                if (
                    finite
                    and values["facegate:candidates:rate5m"] > 0
                    and values["facegate:candidate_reject_ratio:rate5m"] > 0
                ):
                    break
                time.sleep(1.0)
            else:
                pytest.fail(f"the recording rules never all became numbers: {values}")
        assert values.get('up{job="facegate"}') == 1.0, values
        assert values["facegate_candidates_total"] > 0
        assert values["facegate:candidates:rate5m"] > 0
        assert 0 < values["facegate:candidate_reject_ratio:rate5m"] <= 1
        assert values["facegate:attempts_per_image:mean5m"] >= 1
        rules = _api(base, "/api/v1/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        # Every dashboard query parses and runs against the real server's series.
        for expr in _dashboard_queries():
            query = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
            assert _api(base, "/api/v1/query", query=query)["status"] == "success", query
    finally:
        server.stop()
