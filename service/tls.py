"""TLS and mutual TLS: server credentials from the settings, client channels for the CLI
and the health check, the verified client identity of a call, and the interceptor that
admits only the allowed client certificates (FACEGATE_TLS_CLIENT_ALLOWED)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from service.client_identity import ClientAllowlist, ClientNames

log = logging.getLogger("facegate.tls")

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


def _auth_context(context: Any) -> dict[str, Any]:
    try:
        return dict(context.auth_context() or {})
    except Exception:  # a context without transport security information
        return {}


def client_subject(context: Any) -> str | None:
    """The verified client certificate's subject (mutual TLS), else None."""
    auth = _auth_context(context)
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            value = values[0]
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text[:256]
    return None


def client_names(context: Any) -> ClientNames:
    """Subject and SANs of the verified client certificate (empty without mutual TLS)."""
    return ClientNames.from_auth_context(_auth_context(context))


DENIED = "this client certificate is not allowed to call this server (FACEGATE_TLS_CLIENT_ALLOWED)"


class AllowlistInterceptor(grpc.aio.ServerInterceptor):
    """Every method (generation, health, reflection) answers PERMISSION_DENIED to a client
    certificate the allowlist does not name, before its handler runs. gRPC has no hook in
    the handshake itself, so the check wraps each handler."""

    def __init__(self, allowlist: ClientAllowlist) -> None:
        self.allowlist = allowlist

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(getattr(handler_call_details, "method", "?"))
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: self._guard(behaviour, method)})
        return handler

    def _admit(self, context: Any, method: str) -> bool:
        names = client_names(context)
        if self.allowlist.allows(names):
            return True
        log.warning(
            "refused %s: client certificate with %s is not allowed", method, names.describe()
        )
        return False

    def _guard(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                if not self._admit(context, method):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)
                async for response in behaviour(request, context):
                    yield response

            return streaming

        async def call(request: Any, context: Any) -> Any:
            if not self._admit(context, method):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return call
