"""Mutual TLS (issue 9 §3, §8; issue 20 §5): FACEGATE_TLS_CLIENT_CA makes client
certificates required and verified, and FACEGATE_TLS_CLIENT_ALLOWED admits only the named
subjects or SANs (on every method: generation, health, reflection); the CLI client and the
health check speak TLS and mTLS, the health check with a certificate of its own; the
verified subject reaches the audit log and can carry its own concurrency limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.cli import main as cli_main
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.tls import open_channel
from tests.conftest import REPO
from tests.servers import InProcessServer, settings_for


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(folder: Path, name: str, subject: str, ca: str, san: str | None = None) -> None:
    key, csr, crt = (folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", subject)  # fmt: skip
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / f"{ca}.crt"),
             "-CAkey", str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "1",
             "-out", str(crt), "-extfile", str(ext))  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", f"/CN=facegate test {ca}", "-keyout", str(folder / f"{ca}.key"),
                 "-out", str(folder / f"{ca}.crt"))  # fmt: skip
    _signed(folder, "server", "/CN=localhost", "ca", san="localhost")
    _signed(folder, "alice", "/O=facegate/CN=alice", "ca")
    _signed(folder, "mallory", "/O=facegate/CN=mallory", "rogue-ca")
    # Issued by the client CA, but not on the allowlist.
    _signed(folder, "bob", "/O=facegate/CN=bob", "ca")
    # The health check's own certificate, allowed by its SAN (its subject is not listed).
    _signed(folder, "probe", "/CN=facegate-probe", "ca", san="probe.facegate")
    return folder


ALLOWED = ["O=facegate,CN=alice", "DNS:probe.facegate"]


@pytest.fixture(scope="module")
def mtls_server(
    demo_index: Path,
    pki: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("mtls")
    running = InProcessServer(
        settings_for(
            demo_index,
            tmp,
            tls_cert=pki / "server.crt",
            tls_key=pki / "server.key",
            tls_client_ca=pki / "ca.crt",
            tls_client_allowed=ALLOWED,
        )
    )
    yield running
    running.stop()


def _target(server: InProcessServer) -> str:
    return f"localhost:{server.server.grpc_port}"


def _call(channel: grpc.Channel, seed: int = 5) -> pb.GenerateResponse:
    return pb_grpc.GenerationServiceStub(channel).Generate(
        pb.GenerateRequest(count=2, seed=seed), timeout=60
    )


def test_client_without_a_certificate_is_refused(mtls_server: InProcessServer, pki: Path) -> None:
    channel = open_channel(_target(mtls_server), ca=pki / "ca.crt")
    with channel, pytest.raises(grpc.RpcError) as info:
        _call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(_target(mtls_server)) as plain, pytest.raises(grpc.RpcError):
        _call(plain)


def test_client_with_a_certificate_from_another_ca_is_refused(
    mtls_server: InProcessServer, pki: Path
) -> None:
    channel = open_channel(
        _target(mtls_server), ca=pki / "ca.crt", cert=pki / "mallory.crt", key=pki / "mallory.key"
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        _call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_signed_by_the_ca_is_served_and_audited(
    mtls_server: InProcessServer, pki: Path
) -> None:
    channel = open_channel(
        _target(mtls_server), ca=pki / "ca.crt", cert=pki / "alice.crt", key=pki / "alice.key"
    )
    with channel:
        response = _call(channel, seed=1)  # seed 1 meets enrolled faces: rejections are audited
        # Allowed (by subject, in another RDN order than gRPC writes it): reflection too.
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "facegate.v1.GenerationService" in services
    assert len(response.images) == 2 and response.summary.candidates_rejected >= 1
    audit = Path(mtls_server.server.settings.audit_log).read_text().splitlines()
    mine = [
        json.loads(line)
        for line in audit
        if json.loads(line)["request_id"] == response.summary.request_id
    ]
    assert mine and all("CN=alice" in (r["client"] or "") for r in mine), mine


def test_cli_generate_speaks_mtls(
    mtls_server: InProcessServer, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["generate", "--target", _target(mtls_server), "--count", "1", "--seed", "3"]
    tls = ["--tls-ca", str(pki / "ca.crt")]
    client = ["--tls-cert", str(pki / "alice.crt"), "--tls-key", str(pki / "alice.key")]
    assert cli_main([*common, "--out", str(tmp_path / "a"), *tls, *client]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "OK" and Path(summary["written"][0]["path"]).is_file()
    assert cli_main([*common, "--out", str(tmp_path / "b"), *tls]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "UNAVAILABLE"


def _healthcheck(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.healthcheck", target],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_health_check_follows_the_tls_settings(mtls_server: InProcessServer, pki: Path) -> None:
    target = f"127.0.0.1:{mtls_server.server.grpc_port}"
    # The probe presents a client certificate of its own (FACEGATE_TLS_CLIENT_CERT/_KEY).
    env = {
        "FACEGATE_TLS_CERT": str(pki / "server.crt"),
        "FACEGATE_TLS_KEY": str(pki / "server.key"),
        "FACEGATE_TLS_CLIENT_CA": str(pki / "ca.crt"),
        "FACEGATE_TLS_CA": str(pki / "ca.crt"),
        "FACEGATE_TLS_CLIENT_CERT": str(pki / "alice.crt"),
        "FACEGATE_TLS_CLIENT_KEY": str(pki / "alice.key"),
    }
    ok = _healthcheck(target, env)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    plain = _healthcheck(target, {})
    assert plain.returncode == 1


def test_the_health_check_never_presents_the_servers_certificate(
    mtls_server: InProcessServer, pki: Path
) -> None:
    """Under mutual TLS without a certificate of its own, the probe says what to set; it
    does not fall back to the server's pair (which would make every server certificate of
    that issuer a client). Its own certificate passes by its SAN."""
    target = f"127.0.0.1:{mtls_server.server.grpc_port}"
    server_env = {
        "FACEGATE_TLS_CERT": str(pki / "server.crt"),
        "FACEGATE_TLS_KEY": str(pki / "server.key"),
        "FACEGATE_TLS_CLIENT_CA": str(pki / "ca.crt"),
        "FACEGATE_TLS_CA": str(pki / "ca.crt"),
    }
    missing = _healthcheck(target, server_env)
    assert missing.returncode == 1 and "SERVING" not in missing.stdout
    assert "FACEGATE_TLS_CLIENT_CERT" in missing.stderr, missing.stderr
    own = _healthcheck(
        target,
        server_env
        | {
            "FACEGATE_TLS_CLIENT_CERT": str(pki / "probe.crt"),
            "FACEGATE_TLS_CLIENT_KEY": str(pki / "probe.key"),
        },
    )
    assert own.returncode == 0 and own.stdout.strip() == "SERVING", own.stderr


@pytest.mark.parametrize("who", ["bob", "server"])
def test_a_certificate_of_the_client_ca_not_on_the_allowlist_is_denied_everywhere(
    mtls_server: InProcessServer, pki: Path, who: str
) -> None:
    """bob: issued by the client CA, not allowed. server: the server's own certificate,
    which the client CA also issued, presented as a client's."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = open_channel(
        _target(mtls_server), ca=pki / "ca.crt", cert=pki / f"{who}.crt", key=pki / f"{who}.key"
    )
    with channel:
        with pytest.raises(grpc.RpcError) as generate:
            _call(channel)
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as stream:
            list(
                pb_grpc.GenerationServiceStub(channel).GenerateStream(
                    pb.GenerateRequest(count=1), timeout=10
                )
            )
        with pytest.raises(grpc.RpcError) as reflection:
            ProtoReflectionDescriptorDatabase(channel).get_services()
    for refused in (generate, health, stream, reflection):
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "FACEGATE_TLS_CLIENT_ALLOWED" in (refused.value.details() or "")
