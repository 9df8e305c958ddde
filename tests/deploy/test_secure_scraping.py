"""The deployment artefacts: every server they start is keyed, metrics are
scraped over the network only with a token or a client certificate, the monitoring UIs
are not public, and the TLS overlays probe through the health check (exec probes).

The Kubernetes overlays are rendered by kustomize itself (`kubectl kustomize`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.client_identity import ClientAllowlist
from service.config import Settings, load_settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def _settings_of(config: dict[str, str]) -> Settings:
    """The settings a pod builds from this ConfigMap (from its environment, as it does)."""
    known = {f"FACEGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("FACEGATE_")]:
            env.delenv(name)
        for name, value in config.items():
            env.setenv(name, value)
        return load_settings()


def _rendered(overlay: str) -> dict[str, dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render the overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}


def _container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(resources["Deployment"]["spec"]["template"]["spec"]["containers"][0])


def _mounted_files(resources: dict[str, dict[str, Any]]) -> set[str]:
    """Every file path a Secret volume puts into the container."""
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = set()
    for mount in _container(resources)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly") is True, mount
        assert secret["defaultMode"] & 0o007 == 0, secret  # nothing for "other"
        files |= {f"{mount['mountPath']}/{item['path']}" for item in secret["items"]}
    return files


def _secret_paths(settings: Settings) -> set[str]:
    names = [n for n, f in Settings.model_fields.items() if f.annotation in (Path | None, Path)]
    return {str(getattr(settings, n)) for n in names if getattr(settings, n) is not None} - {
        str(settings.index_path),
        str(settings.models_dir),
    }


def test_compose_keys_the_server_and_scrapes_metrics_with_a_token() -> None:
    compose = _compose()
    facegate = compose["services"]["facegate"]
    env = facegate["environment"]
    assert env["FACEGATE_SEED_KEY_FILE"] == "/run/secrets/seed_key"
    assert "FACEGATE_ALLOW_UNKEYED_SEEDS" not in env
    assert "FACEGATE_AUDIT_CLEAR_IDENTITIES" not in env
    # Prometheus scrapes on the compose network: beyond loopback, but only with the token.
    assert env["FACEGATE_METRICS_HOST"] == "0.0.0.0"
    assert env["FACEGATE_METRICS_BEARER_TOKEN_FILE"] == "/run/secrets/metrics_token"
    assert "metrics_token" in facegate["secrets"]
    assert facegate["ports"] == ["50051:50051"]  # the product; metrics stay unpublished
    prometheus = compose["services"]["prometheus"]
    assert "metrics_token" in prometheus["secrets"]
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (scrape,) = config["scrape_configs"]
    assert scrape["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/metrics_token",  # where compose mounts the secret
    }
    assert compose["secrets"]["metrics_token"]["file"] == "../var/metrics.token"
    makefile = (REPO / "Makefile").read_text()
    assert "compose-secrets:" in makefile and "var/metrics.token" in makefile


def test_compose_publishes_prometheus_and_grafana_on_loopback_only_and_grafana_asks_a_login() -> (
    None
):
    services = _compose()["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        assert services[name]["ports"] == [f"127.0.0.1:{port}:{port}"], name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in services["grafana"]["secrets"]


def test_kubernetes_base_scrapes_with_the_bearer_token_of_one_secret() -> None:
    resources = _rendered("cpu")
    config = resources["ConfigMap"]["data"]
    settings = _settings_of(config)
    assert settings.seed_key_file is not None and not settings.allow_unkeyed_seeds
    assert settings.audit_identities == "hashed"
    assert settings.metrics_host == "0.0.0.0" and settings.metrics_auth == "bearer"
    assert _secret_paths(settings) <= _mounted_files(resources)
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    token_volume = next(v for v in pod["volumes"] if v["name"] == "metrics-token")
    (endpoint,) = resources["PodMonitor"]["spec"]["podMetricsEndpoints"]
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["name"] == token_volume["secret"]["secretName"]
    assert credentials["key"] == token_volume["secret"]["items"][0]["key"]


@pytest.mark.parametrize("overlay", ["tls", "mtls"])
def test_tls_overlays_probe_through_the_health_check_and_mount_every_file(overlay: str) -> None:
    resources = _rendered(overlay)
    for kind in ("ConfigMap", "Deployment", "Service", "NetworkPolicy"):
        kubernetes_validate.validate(resources[kind], "1.37.0", strict=True)
    settings = _settings_of(resources["ConfigMap"]["data"])
    assert settings.tls_cert is not None and settings.tls_ca is not None
    container = _container(resources)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe], probe  # the native probe cannot speak TLS
        assert container[probe]["exec"]["command"] == ["python", "-m", "service.healthcheck"]
        assert container[probe]["timeoutSeconds"] >= 3
    # Every file a setting names comes from a Secret mounted read-only.
    assert _secret_paths(settings) <= _mounted_files(resources)
    assert "appProtocol" not in resources["Service"]["spec"]["ports"][0]  # not h2c any more
    (endpoint,) = resources["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    assert {"ca", "cert", "keySecret"} <= set(tls) and tls["serverName"] == settings.tls_server_name
    assert settings.metrics_auth == "mtls+bearer"
    if overlay == "mtls":
        assert settings.tls_client_ca is not None
        # The probe has its own certificate, and the allowlist admits it by its SAN.
        assert settings.tls_client_cert is not None and settings.tls_client_key is not None
        assert settings.tls_client_cert != settings.tls_cert
        assert "DNS:facegate-healthcheck" in settings.tls_client_allowed
        assert ClientAllowlist(settings.tls_client_allowed)
    else:
        assert settings.tls_client_ca is None and not settings.tls_client_allowed
