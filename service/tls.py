"""TLS and mutual TLS: server credentials from the settings, client channels for the CLI
and the health check, and the verified client identity of a call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

# The largest response the server sends (service.server.MAX_MESSAGE_BYTES): clients must
# accept it, or a large Generate fails with RESOURCE_EXHAUSTED on the client side.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """None for plaintext; with `client_ca`, client certificates are required and verified."""
    if cert is None or key is None:
        return None
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=Path(client_ca).read_bytes(), require_client_auth=True
    )


def client_options(server_name: str | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 1024 * 1024),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def open_channel(
    target: str,
    *,
    ca: Path | str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A blocking channel: plaintext without `ca`, TLS with it, mutual TLS with cert and key."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    if ca is None and cert is None:
        return grpc.insecure_channel(target, options=client_options())
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca is not None else None,
        private_key=Path(key).read_bytes() if key is not None else None,
        certificate_chain=Path(cert).read_bytes() if cert is not None else None,
    )
    return grpc.secure_channel(target, credentials, options=client_options(server_name))


def client_subject(context: Any) -> str | None:
    """The verified client certificate's subject (mutual TLS), else None."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without transport security information
        return None
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            value = values[0]
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text[:256]
    return None
