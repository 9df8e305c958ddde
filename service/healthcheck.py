"""Container health probe through the standard gRPC health service.

    python -m service.healthcheck [HOST:PORT]

Exits 0 when the server reports SERVING, 1 otherwise (starting, draining, unreachable,
misconfigured). It follows the server's TLS settings: with FACEGATE_TLS_CERT it speaks TLS
(verifying the server with FACEGATE_TLS_CA, default the certificate itself, under the name
FACEGATE_TLS_SERVER_NAME); with FACEGATE_TLS_CLIENT_CA (mutual TLS) it presents its own
client certificate, FACEGATE_TLS_CLIENT_CERT and FACEGATE_TLS_CLIENT_KEY. It never presents
the server's certificate: a server certificate that passes as a client would let every
server certificate of that issuer call. Kubernetes' native gRPC probes cannot speak TLS:
with TLS on, run this as an exec probe (deploy/k8s/components/tls).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.tls import open_channel

# Read from the environment directly: service.config imports the filter (torch, FAISS),
# which would take seconds of the probe's timeout. The names are the server's settings.
ENV = os.environ


class ProbeConfigError(Exception):
    """The probe cannot speak to the server as configured; the message says what to set."""


def channel_for(target: str, env: Mapping[str, str] = ENV) -> grpc.Channel:
    cert = env.get("FACEGATE_TLS_CERT") or None
    if cert is None:
        return open_channel(target)
    client_cert = env.get("FACEGATE_TLS_CLIENT_CERT") or None
    client_key = env.get("FACEGATE_TLS_CLIENT_KEY") or None
    if env.get("FACEGATE_TLS_CLIENT_CA") and (client_cert is None or client_key is None):
        raise ProbeConfigError(
            "the server requires client certificates (FACEGATE_TLS_CLIENT_CA): give the health "
            "check one of its own with FACEGATE_TLS_CLIENT_CERT and FACEGATE_TLS_CLIENT_KEY "
            "(and allow its subject in FACEGATE_TLS_CLIENT_ALLOWED)"
        )
    return open_channel(
        target,
        ca=env.get("FACEGATE_TLS_CA") or cert,
        cert=client_cert,
        key=client_key,
        server_name=env.get("FACEGATE_TLS_SERVER_NAME") or "localhost",
    )


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{ENV.get('FACEGATE_GRPC_PORT', '50051')}"
    try:
        with channel_for(target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="facegate.v1.GenerationService"), timeout=3
            )
    except ProbeConfigError as err:
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    except (grpc.RpcError, OSError) as err:
        code = err.code().name if isinstance(err, grpc.RpcError) else type(err).__name__
        print(f"unhealthy: {code}", file=sys.stderr)
        return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(
        "SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    )
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
