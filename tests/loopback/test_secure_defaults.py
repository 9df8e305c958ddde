"""Issue 20: a server started with nothing but an index is keyed, its metrics are not
public and its audit log names no one; anything less is an explicit, logged opt-in, and
each refusal says what to set.

Refusals run `facegate serve` in a subprocess against an index folder that only has to
pass the cheap preflight: they must come before any model or index is loaded. Servers
whose models never need to load use a loader that holds (the metrics endpoint and the
configuration are up before loading)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest
from service.audit import JsonLinesAuditLog, Rejection, open_owner_only
from service.config import ConfigError, Settings, load_settings
from service.metrics import ServiceMetrics
from service.server import LoadedService
from tests.conftest import REPO, TEST_SEED_KEY, write_seed_key
from tests.servers import InProcessServer, free_port

# --- refusals, before anything loads ---------------------------------------------------


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`facegate serve` with only these FACEGATE_* settings (and a throwaway port)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    settings = {
        "FACEGATE_GRPC_HOST": "127.0.0.1",
        "FACEGATE_GRPC_PORT": str(free_port()),
        "FACEGATE_METRICS_PORT": str(free_port()),
        "FACEGATE_MODELS_DIR": str(REPO / "models"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=REPO,
        env={**clean, "PYTHONPATH": str(REPO), **settings},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture()
def index_stub(tmp_path: Path) -> Path:
    """Passes the preflight (a manifest is there) and nothing else: a server that got as
    far as loading it would fail on it, with another message."""
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder


def test_serve_refuses_to_start_without_a_seed_key(index_stub: Path, tmp_path: Path) -> None:
    result = serve({"FACEGATE_INDEX_PATH": str(index_stub)}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "FACEGATE_SEED_KEY_FILE is not set" in result.stderr, result.stderr
    assert "FACEGATE_ALLOW_UNKEYED_SEEDS=true" in result.stderr  # the way out, named
    assert "loading models" not in result.stderr and "Traceback" not in result.stderr


def test_the_configuration_checks_come_first(tmp_path: Path) -> None:
    """No index and no key: the index, the first thing to fix, is what the message names."""
    result = serve({"FACEGATE_INDEX_PATH": str(tmp_path / "missing")}, tmp_path)
    assert result.returncode == 2
    assert "no identity index" in result.stderr and "FACEGATE_SEED_KEY_FILE" not in result.stderr


@pytest.mark.parametrize(
    ("case", "names"),
    [
        # Unkeyed seeds leave the audit log without a key to hash identities with.
        ("unkeyed_audit", ("FACEGATE_AUDIT_KEY_FILE", "FACEGATE_AUDIT_CLEAR_IDENTITIES")),
        # The old switch can no longer turn hashing off silently.
        ("hash_off", ("FACEGATE_AUDIT_HASH_IDENTITIES", "FACEGATE_AUDIT_CLEAR_IDENTITIES")),
        # An audit file planted as a symlink is never written through.
        ("audit_symlink", ("FACEGATE_AUDIT_LOG", "symlink")),
        # A short metrics token is refused, not used.
        ("short_token", ("FACEGATE_METRICS_BEARER_TOKEN_FILE",)),
    ],
)
def test_unsafe_settings_are_refused_naming_what_to_set(
    index_stub: Path, tmp_path: Path, case: str, names: tuple[str, ...]
) -> None:
    keyed = {"FACEGATE_INDEX_PATH": str(index_stub)}
    keyed["FACEGATE_SEED_KEY_FILE"] = str(write_seed_key(tmp_path))
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone else's file\n")
    env = {
        "unkeyed_audit": {"FACEGATE_INDEX_PATH": str(index_stub)}
        | {"FACEGATE_ALLOW_UNKEYED_SEEDS": "true"},
        "hash_off": keyed | {"FACEGATE_AUDIT_HASH_IDENTITIES": "false"},
        "audit_symlink": keyed | {"FACEGATE_AUDIT_LOG": str(tmp_path / "audit.jsonl")},
        "short_token": keyed | {"FACEGATE_METRICS_BEARER_TOKEN_FILE": str(tmp_path / "t")},
    }[case]
    (tmp_path / "audit.jsonl").symlink_to(target)
    (tmp_path / "t").write_text("short\n")
    result = serve(env, tmp_path)
    assert result.returncode == 2, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    assert "loading models" not in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "someone else's file\n"


# --- what a server shows of its choices --------------------------------------------------


class HeldLoader:
    """Never loads: the test looks at the server while it 'loads', then lets it fail."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, settings: Settings, metrics: ServiceMetrics) -> LoadedService:
        self.release.wait(300)
        raise RuntimeError("the test ends the held load")


@pytest.fixture()
def held() -> Iterator[list[InProcessServer]]:
    """Start servers with `held.append(InProcessServer(settings, loader, wait=False))`."""
    servers: list[InProcessServer] = []
    yield servers
    for running in servers:
        loader = running.server.loader
        assert isinstance(loader, HeldLoader)
        loader.release.set()
        with pytest.raises(RuntimeError, match="held load"):
            running.started(60)
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(10)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "index_path": tmp_path / "index",
        "models_dir": REPO / "models",
        "audit_log": "none",
        **overrides,
    }
    (tmp_path / "index").mkdir(exist_ok=True)
    (tmp_path / "index" / "manifest.json").write_text("{}")
    return Settings(**values)  # type: ignore[arg-type]


def _start(held: list[InProcessServer], settings: Settings) -> InProcessServer:
    running = InProcessServer(settings, HeldLoader(), wait=False)
    held.append(running)
    return running


def _config_info(url: str, **request: object) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(url, **request)[1]
    (labels,) = [
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "facegate_config_info"
    ]
    return dict(labels)


def _listening(port: int) -> set[str]:
    """Local addresses listening on `port` (from /proc/net: no traffic sent anywhere)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # LISTEN
                found.add(address if len(address) == width else "?")
    return found


def test_unkeyed_opt_in_is_logged_and_shown_and_metrics_stay_on_loopback(
    held: list[InProcessServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        running = _start(held, _settings(tmp_path, allow_unkeyed_seeds=True))
    info = _config_info(running.metrics_url)
    assert info["seeds"] == "unkeyed" and info["allow_unkeyed_seeds"] == "True"
    assert info["metrics_host"] == "127.0.0.1" and info["metrics_auth"] == "none"
    assert info["audit_identities"] == "off"
    assert "FACEGATE_ALLOW_UNKEYED_SEEDS=true" in caplog.text
    # Loopback only, by default: nobody off this host reaches /metrics.
    assert _listening(running.server.metrics_port) == {"0100007F"}  # 127.0.0.1


def test_a_keyed_server_says_so_and_opening_metrics_unauthenticated_is_a_warned_opt_in(
    held: list[InProcessServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the opt-in this is refused (tests/unit/test_startup_safety.py).
    settings = _settings(
        tmp_path,
        seed_key_file=write_seed_key(tmp_path),
        metrics_host="0.0.0.0",
        metrics_allow_unauthenticated=True,
    )
    with caplog.at_level("WARNING"):
        running = _start(held, settings)
    info = _config_info(f"http://127.0.0.1:{running.server.metrics_port}/metrics")
    assert info["seeds"] == "keyed" and info["allow_unkeyed_seeds"] == "False"
    assert _listening(running.server.metrics_port) == {"00000000"}  # what the operator chose
    assert (
        "accept any scraper" in caplog.text and "FACEGATE_METRICS_BEARER_TOKEN_FILE" in caplog.text
    )
    assert "FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true" in caplog.text
    assert info["metrics_allow_unauthenticated"] == "True"


# --- metrics for the monitoring system only ---------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("metrics-pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", "1", "-subj", f"/CN={ca}", "-keyout", str(folder / f"{ca}.key"),
                 "-out", str(folder / f"{ca}.crt"))  # fmt: skip
    for name, ca, ext in (
        ("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("prometheus", "ca", "extendedKeyUsage=clientAuth"),
        ("stranger", "other-ca", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"),
                 "-subj", f"/CN={name}")  # fmt: skip
        (folder / f"{name}.ext").write_text(ext + "\n")
        csr, crt, ext_file = (folder / f"{name}.{suffix}" for suffix in ("csr", "crt", "ext"))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(folder / f"{ca}.crt"),
                 "-CAkey", str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "1",
                 "-out", str(crt), "-extfile", str(ext_file))  # fmt: skip
    return folder


TOKEN = "scrape-token-5f3a9c1d2b7e4f60"


def _get(
    url: str,
    *,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def _client_context(pki: Path, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return context


def test_metrics_need_the_bearer_token(held: list[InProcessServer], tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN + "\n")  # a trailing newline, as `echo` writes it
    settings = _settings(
        tmp_path, seed_key_file=write_seed_key(tmp_path), metrics_bearer_token_file=token_file
    )
    running = _start(held, settings)
    url = running.metrics_url
    assert _get(url)[0] == 401
    assert _get(url, token=TOKEN[:-1] + "x")[0] == 401
    assert _get(url, token=TOKEN.upper())[0] == 401
    status, text = _get(url, token=TOKEN)
    assert status == 200 and "facegate_ready" in text
    assert _config_info(url, token=TOKEN)["metrics_auth"] == "bearer"


def test_metrics_over_tls_need_a_client_certificate_from_the_client_ca(
    held: list[InProcessServer], tmp_path: Path, pki: Path
) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN)
    settings = _settings(
        tmp_path,
        seed_key_file=write_seed_key(tmp_path),
        metrics_tls_cert=pki / "server.crt",
        metrics_tls_key=pki / "server.key",
        metrics_tls_client_ca=pki / "ca.crt",
        metrics_bearer_token_file=token_file,
    )
    running = _start(held, settings)
    port = running.server.metrics_port
    https = f"https://localhost:{port}/metrics"
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        _get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)  # plain HTTP: no answer
    for cert in (None, "stranger"):  # no certificate; a certificate from another CA
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _get(https, token=TOKEN, context=_client_context(pki, cert))
    prometheus = _client_context(pki, "prometheus")
    assert _get(https, context=prometheus)[0] == 401  # the certificate, but not the token
    status, text = _get(https, token=TOKEN, context=prometheus)
    assert status == 200 and "facegate_config_info" in text
    assert _config_info(https, token=TOKEN, context=prometheus)["metrics_auth"] == "mtls+bearer"


def test_a_stalled_tls_client_does_not_hold_the_metrics_listener(
    held: list[InProcessServer], tmp_path: Path, pki: Path
) -> None:
    """The handshake runs in the request's thread: a client that connects and says nothing
    leaves the endpoint answering others."""
    import socket

    settings = _settings(
        tmp_path,
        seed_key_file=write_seed_key(tmp_path),
        metrics_tls_cert=pki / "server.crt",
        metrics_tls_key=pki / "server.key",
        metrics_tls_client_ca=pki / "ca.crt",
    )
    running = _start(held, settings)
    port = running.server.metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=5):  # connects, never speaks
        status, _ = _get(
            f"https://localhost:{port}/metrics", context=_client_context(pki, "prometheus")
        )
    assert status == 200


# --- an audit log that is safe to ship --------------------------------------------------


def test_the_audit_file_is_never_opened_through_a_symlink_or_a_hard_link(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("untouched\n")
    link = tmp_path / "audit-link.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        open_owner_only(link)
    hard = tmp_path / "audit-hard.jsonl"
    os.link(target, hard)
    with pytest.raises(OSError, match="hard link"):
        open_owner_only(hard)
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"regular file|cannot be opened"):
        open_owner_only(fifo)  # refused at once, not blocked waiting for a reader
    assert target.read_text() == "untouched\n"
    loose = tmp_path / "logs" / "audit.jsonl"
    loose.parent.mkdir()
    loose.write_text("")
    loose.chmod(0o644)
    open_owner_only(loose).close()
    assert loose.stat().st_mode & 0o777 == 0o600


def test_facegate_audit_hash_prints_the_servers_pseudonym(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    for name in [n for n in os.environ if n.startswith("FACEGATE_")]:
        monkeypatch.delenv(name)
    assert main(["audit", "hash", "person-0042"]) == 2
    assert "FACEGATE_SEED_KEY_FILE" in capsys.readouterr().err
    monkeypatch.setenv("FACEGATE_SEED_KEY_FILE", str(write_seed_key(tmp_path)))
    assert main(["audit", "hash", "person-0042", "person-0043"]) == 0
    lines = capsys.readouterr().out.split()
    subkey = derive_subkey(TEST_SEED_KEY, AUDIT_IDENTITY)
    assert lines == [identity_digest(subkey, f"person-{n}") for n in ("0042", "0043")]
    # An audit key of its own takes over from the seed key.
    audit_key = tmp_path / "audit.key"
    audit_key.write_bytes(bytes(range(50, 82)))
    monkeypatch.setenv("FACEGATE_AUDIT_KEY_FILE", str(audit_key))
    assert main(["audit", "hash", "person-0042"]) == 0
    own = identity_digest(derive_subkey(audit_key.read_bytes(), AUDIT_IDENTITY), "person-0042")
    assert capsys.readouterr().out.split() == [own] != lines[:1]


def test_clear_text_identities_are_an_explicit_logged_opt_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.security import service_keys

    path = tmp_path / "audit.jsonl"
    record = Rejection("r1", 0, 0, "identity_match", 0.8, "person-0042", 1, None, "caller-1")
    settings = Settings(  # type: ignore[call-arg]
        allow_unkeyed_seeds=True, audit_log=str(path), audit_clear_identities=True
    )
    with caplog.at_level("WARNING"):
        keys = service_keys(settings)
    assert keys.seed_key is None and keys.hash_identity is None
    assert "FACEGATE_AUDIT_CLEAR_IDENTITIES=true" in caplog.text
    assert settings.public_info()["audit_identities"] == "clear"
    audit = JsonLinesAuditLog.open(str(path), hash_identity=keys.hash_identity)
    audit.rejection(record)
    audit.close()
    line = json.loads(path.read_text())
    assert line["identity"] == "person-0042" and line["caller_request_id"] == "caller-1"
    # Unkeyed seeds with an audit key of their own: hashed under that key.
    audit_key = tmp_path / "audit.key"
    audit_key.write_bytes(os.urandom(32))
    keyed_audit = Settings(  # type: ignore[call-arg]
        allow_unkeyed_seeds=True, audit_log=str(path), audit_key_file=audit_key
    )
    hashed = service_keys(keyed_audit).hash_identity
    assert hashed is not None
    subkey = derive_subkey(audit_key.read_bytes(), AUDIT_IDENTITY)
    assert hashed("person-0042") == identity_digest(subkey, "person-0042")
    with pytest.raises(ConfigError, match="FACEGATE_AUDIT_KEY_FILE"):
        load_settings(audit_clear_identities=True, audit_key_file=audit_key)
