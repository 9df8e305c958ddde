"""Issue 9 in the deployment artefacts: metrics reachable by the monitoring namespace only,
the seed key from a Secret, read-only volumes; and the coarse similarity histogram."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from filter.decide import ImageVerdict
from service.config import Settings
from service.metrics import ServiceMetrics, quantize_similarity, similarity_buckets
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


# Every threshold the configuration accepts ([-1, 1]), calibrated ones included.
THRESHOLDS = [-1.0, -0.95, -0.3, 0.0, 0.05, 0.29, 0.40, 0.565, 0.571, 0.99, 1.0]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_similarity_histogram_is_coarse(threshold: float) -> None:
    edges = similarity_buckets(threshold)
    assert edges[-1] == pytest.approx(threshold)  # nothing finer than "rejected" above it
    widths = [b - a for a, b in itertools.pairwise(edges)]
    assert all(w >= 0.1 - 1e-9 for w in widths), edges
    assert 1 <= len(edges) <= 5 and edges == tuple(sorted(edges))
    assert all(edge >= -1.0 for edge in edges)


def _buckets(metrics: ServiceMetrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("facegate_similarity"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_every_accepted_threshold_starts_and_reloads(threshold: float) -> None:
    """FACEGATE_THRESHOLD=-1 ended startup in `Must have at least two buckets` (issue 19)."""
    metrics = ServiceMetrics(threshold)  # startup
    metrics.set_thresholds(0.4, None)  # a reload to another threshold
    metrics.set_thresholds(threshold, 0.9)  # and back
    metrics.candidate(_verdict(threshold, 1.0))
    buckets = _buckets(metrics)
    assert buckets["facegate_similarity_count"] == 2
    assert buckets['facegate_similarity_bucket{le="+Inf"}'] == 2


@pytest.mark.parametrize("threshold", [-1.0, -0.95, 1.0])
def test_the_server_builds_with_any_accepted_threshold(threshold: float) -> None:
    """Where `FACEGATE_THRESHOLD=-1` ended startup on main: the server's metrics."""
    from service.server import FacegateServer

    server = FacegateServer(Settings(threshold=threshold))  # type: ignore[call-arg]
    assert server.metrics.similarity.edges[-1] == threshold
    text = generate_latest(server.metrics.registry).decode()
    # A refused looser reload has its own result, exported from 0 for the alert's rate.
    assert 'facegate_index_reloads_total{result="refused_looser"} 0.0' in text


def _verdict(*similarities: float) -> ImageVerdict:
    return ImageVerdict(
        passed=False,
        reason=None,
        faces=len(similarities),
        max_similarity=max(similarities),
        identity=None,
        face_similarities=similarities,
    )


def test_rejections_are_counted_above_the_threshold() -> None:
    """Each similarity lands in the bucket whose upper edge is the first at or above it.
    On main a value was moved to its bucket's lower edge first, so 4 rejections at ~1.0
    were counted in le=0.572, at or below the threshold."""
    metrics = ServiceMetrics(0.572)
    metrics.candidate(_verdict(0.999, 1.0, 0.97, 0.9))  # four rejections
    metrics.candidate(_verdict(0.52))  # just under the threshold: a pass
    metrics.candidate(_verdict(0.372, 0.05))  # exactly on an edge: in that bucket
    buckets = _buckets(metrics)
    assert buckets['facegate_similarity_bucket{le="0.572"}'] == 3  # 0.52, 0.372, 0.05
    assert buckets['facegate_similarity_bucket{le="0.472"}'] == 2  # 0.372 and 0.05, not 0.52
    assert buckets['facegate_similarity_bucket{le="0.372"}'] == 2  # 0.372 is <= 0.372
    assert buckets['facegate_similarity_bucket{le="0.272"}'] == 1
    assert buckets['facegate_similarity_bucket{le="0.0"}'] == 0
    assert buckets['facegate_similarity_bucket{le="+Inf"}'] == 7  # the 4 rejections above
    assert buckets["facegate_similarity_count"] == 7


def test_similarity_sum_carries_no_more_than_the_buckets() -> None:
    metrics = ServiceMetrics(0.40)
    metrics.candidate(_verdict(0.3456))
    text = generate_latest(metrics.registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith("facegate_similarity_sum")]
    assert float(line.split()[-1]) == pytest.approx(0.3)  # its bucket (0.3, 0.4]'s lower edge
    assert "0.3456" not in text and "0.345" not in text
    edges = similarity_buckets(0.4)
    assert quantize_similarity(0.95, edges) == pytest.approx(0.4)  # above: the threshold
    assert quantize_similarity(0.4, edges) == pytest.approx(0.3)  # le=0.4: (0.3, 0.4]
    assert quantize_similarity(-0.5, edges) == -1.0
    # A threshold change re-bins and restarts the counts (a counter reset to Prometheus).
    metrics.set_thresholds(0.6, None)
    assert _buckets(metrics)["facegate_similarity_count"] == 0


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
