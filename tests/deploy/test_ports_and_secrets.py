"""The deployment artefacts expose gRPC only: metrics reachable by the monitoring
namespace only; the seed key and the C2PA signer from Secrets, on read-only volumes."""

from __future__ import annotations

from typing import Any

import yaml

from service.config import Settings
from tests.conftest import REPO

K8S_BASE = REPO / "deploy" / "k8s" / "base"


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S_BASE / name).read_text()) if d]
    return docs


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _resources() if d["kind"] == kind]


def _container() -> dict[str, Any]:
    (deployment,) = _kind("Deployment")
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def test_no_service_exposes_the_metrics_port() -> None:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    for service in _kind("Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] not in ("metrics", ports["metrics"]), service


def test_network_policy_admits_only_monitoring_to_metrics() -> None:
    (policy,) = _kind("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "facegate"}
    assert spec["policyTypes"] == ["Ingress"]
    by_port: dict[str, list[Any]] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule.get("from"))
    assert set(by_port) == {"grpc", "metrics"}
    (metrics_from,) = by_port["metrics"]
    assert metrics_from == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_compose_publishes_grpc_only_and_mounts_the_seed_key_secret() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    facegate = compose["services"]["facegate"]
    assert facegate["ports"] == ["50051:50051"]
    assert "seed_key" in facegate["secrets"]
    assert facegate["environment"]["FACEGATE_SEED_KEY_FILE"] == "/run/secrets/seed_key"
    assert compose["secrets"]["seed_key"]["file"] == "../var/seed.key"
    for volume in facegate["volumes"]:
        assert volume.endswith(":ro"), volume


def test_kubernetes_mounts_the_seed_key_from_a_secret_read_only() -> None:
    (config,) = _kind("ConfigMap")
    key_file = config["data"]["FACEGATE_SEED_KEY_FILE"]
    settings = Settings(seed_key_file=key_file)  # type: ignore[call-arg]
    assert settings.seed_key_file is not None
    container = _container()
    (deployment,) = _kind("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret = volumes["seed-key"]["secret"]
    assert secret["secretName"] == "facegate-seed-key"
    assert secret["defaultMode"] & 0o007 == 0  # nothing for "other"
    mount = mounts["seed-key"]
    assert mount["readOnly"] is True
    assert key_file == f"{mount['mountPath']}/{secret['items'][0]['path']}"
    # Every volume that can hold biometric data or secrets is read-only in the container.
    for name, volume_mount in mounts.items():
        if name != "tmp":
            assert volume_mount.get("readOnly") is True, name


def test_compose_mounts_the_c2pa_signer_from_secrets_made_by_make() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    facegate = compose["services"]["facegate"]
    environment = facegate["environment"]
    for variable, secret in (
        ("FACEGATE_C2PA_CERT", "c2pa_chain"),
        ("FACEGATE_C2PA_KEY", "c2pa_key"),
    ):
        assert environment[variable] == f"/run/secrets/{secret}"
        assert secret in facegate["secrets"]
    # The files `make c2pa-test-chain` writes (C2PA_DIR, var/c2pa by default).
    makefile = (REPO / "Makefile").read_text()
    assert "C2PA_DIR ?= var/c2pa" in makefile
    assert compose["secrets"]["c2pa_chain"]["file"] == "../var/c2pa/chain.pem"
    assert compose["secrets"]["c2pa_key"]["file"] == "../var/c2pa/signer.key"


def test_kubernetes_mounts_the_c2pa_signer_from_a_secret_read_only() -> None:
    (config,) = _kind("ConfigMap")
    cert, key = config["data"]["FACEGATE_C2PA_CERT"], config["data"]["FACEGATE_C2PA_KEY"]
    Settings(c2pa_cert=cert, c2pa_key=key)  # type: ignore[call-arg]  # both or neither
    (deployment,) = _kind("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = {m["name"]: m for m in _container()["volumeMounts"]}["c2pa"]
    secret = volumes["c2pa"]["secret"]
    assert secret["secretName"] == "facegate-c2pa"
    assert secret["defaultMode"] & 0o007 == 0  # nothing for "other"
    assert mount["readOnly"] is True
    mounted = {f"{mount['mountPath']}/{item['path']}" for item in secret["items"]}
    assert mounted == {cert, key}
