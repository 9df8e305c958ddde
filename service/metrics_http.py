"""The /metrics endpoint: for the monitoring system only.

Loopback by default (FACEGATE_METRICS_HOST). An operator who opens it to the network
requires TLS with client certificates (FACEGATE_METRICS_TLS_CERT/_KEY/_CLIENT_CA) and/or a
bearer token (FACEGATE_METRICS_BEARER_TOKEN_FILE), the two ways Prometheus authenticates a
scrape; without either the server refuses to start unless
FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true says so (logged as a warning). Per-request
counters read around another caller's request tell what happened to it (its rejections,
its similarity bins): whoever may scrape is an operator.

The TLS handshake runs in the request's own thread, with a timeout, so a client that
stalls in it holds one thread, not the listener.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger("facegate.metrics")

MIN_TOKEN_CHARS = 16
CLIENT_TIMEOUT_SECONDS = 10.0

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsConfigError(ValueError):
    """The metrics endpoint cannot be set up as configured; the message names the setting."""


@dataclass(frozen=True)
class MetricsEndpoint:
    host: str
    port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    bearer_token_file: Path | None = None
    allow_unauthenticated: bool = False

    @property
    def authenticated(self) -> bool:
        """Scrapers must prove who they are (server-only TLS proves nothing about them)."""
        return self.tls_client_ca is not None or self.bearer_token_file is not None

    def refusal(self) -> str | None:
        """Why /metrics must not be served as configured (None: it may)."""
        if self.loopback_only or self.authenticated or self.allow_unauthenticated:
            return None
        return (
            f"metrics on {self.host}:{self.port} would accept any scraper that reaches them "
            "(no client certificate, no bearer token): per-request counters read around "
            "another caller's request show its rejections. Set "
            "FACEGATE_METRICS_BEARER_TOKEN_FILE or FACEGATE_METRICS_TLS_CLIENT_CA, keep "
            "FACEGATE_METRICS_HOST on loopback, or, with a network policy in front, set "
            "FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true"
        )

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name: it may resolve to anything

    def warnings(self) -> list[str]:
        """What the operator chose that leaves /metrics more open than the default."""
        where = f"{self.host}:{self.port}"
        if self.loopback_only:
            return []
        out = []
        if not self.authenticated:
            out.append(
                f"FACEGATE_METRICS_ALLOW_UNAUTHENTICATED=true: metrics on {where} accept any "
                "scraper that reaches them (no client certificate, no bearer token): "
                "per-request counters read around another caller's request show its "
                "rejections. Keep the port behind a network policy, or set "
                "FACEGATE_METRICS_BEARER_TOKEN_FILE / FACEGATE_METRICS_TLS_CLIENT_CA"
            )
        if self.bearer_token_file is not None and self.tls_cert is None:
            out.append(
                f"the metrics bearer token crosses the network in clear text to {where}: "
                "set FACEGATE_METRICS_TLS_CERT/_KEY as well"
            )
        return out


def read_token(path: Path) -> bytes:
    """The bearer token in `path` (surrounding whitespace removed)."""
    name = f"FACEGATE_METRICS_BEARER_TOKEN_FILE {path}"
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise MetricsConfigError(f"{name} cannot be read: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS or any(b <= 0x20 or b >= 0x7F for b in token):
        raise MetricsConfigError(
            f"{name} must hold one token of at least {MIN_TOKEN_CHARS} printable characters "
            "and no spaces (e.g. `head -c 32 /dev/urandom | base64 > metrics.token`)"
        )
    return token


def require_bearer(app: WsgiApp, token: bytes) -> WsgiApp:
    """Answer 401 unless the request carries `Authorization: Bearer <token>`."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        offered = value.strip().encode("latin-1", "replace")
        if scheme.lower() == "bearer" and hmac.compare_digest(offered, token):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", 'Bearer realm="facegate metrics"'),
            ],
        )
        return [b"a bearer token is required\n"]

    return guarded


def tls_context(endpoint: MetricsEndpoint) -> ssl.SSLContext | None:
    if endpoint.tls_cert is None or endpoint.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(endpoint.tls_cert), str(endpoint.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise MetricsConfigError(
            f"FACEGATE_METRICS_TLS_CERT {endpoint.tls_cert} with FACEGATE_METRICS_TLS_KEY "
            f"{endpoint.tls_key} cannot be loaded: {exc}"
        ) from None
    if endpoint.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(endpoint.tls_client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise MetricsConfigError(
                f"FACEGATE_METRICS_TLS_CLIENT_CA {endpoint.tls_client_ca} cannot be loaded: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(CLIENT_TIMEOUT_SECONDS)
        if self.tls is not None:
            # The handshake happens on the first read, in the request's thread.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper without the right certificate fails its handshake: not a server error.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsHttpServer:
    """A running /metrics endpoint on its own daemon thread."""

    def __init__(self, registry: CollectorRegistry, endpoint: MetricsEndpoint) -> None:
        app: WsgiApp = make_wsgi_app(registry)
        if endpoint.bearer_token_file is not None:
            app = require_bearer(app, read_token(endpoint.bearer_token_file))
        tls = tls_context(endpoint)

        try:
            family = _family(endpoint.host)
        except OSError as exc:  # the name does not resolve
            raise MetricsConfigError(
                f"cannot resolve the metrics host {endpoint.host!r} (FACEGATE_METRICS_HOST): "
                f"{exc.strerror or exc}"
            ) from None

        class Server(_MetricsServer):
            address_family = family

        Server.tls = tls
        try:
            self._httpd = make_server(
                endpoint.host, endpoint.port, app, Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise MetricsConfigError(
                f"cannot listen for metrics on {endpoint.host}:{endpoint.port} "
                f"(FACEGATE_METRICS_HOST, FACEGATE_METRICS_PORT): {exc.strerror}"
            ) from None
        self.address: tuple[str, int] = self._httpd.socket.getsockname()[:2]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.address[1])

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return infos[0][0] if infos else socket.AF_INET
