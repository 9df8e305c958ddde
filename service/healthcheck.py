"""Container health probe through the standard gRPC health service.

    python -m service.healthcheck [HOST:PORT]

Exits 0 when the server reports SERVING, 1 otherwise (starting, draining, unreachable).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = (
        argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('FACEGATE_GRPC_PORT', '50051')}"
    )
    try:
        with grpc.insecure_channel(target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="facegate.v1.GenerationService"), timeout=3
            )
    except grpc.RpcError as err:
        print(f"unhealthy: {err.code().name}", file=sys.stderr)
        return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(
        "SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    )
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
