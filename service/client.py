"""A small client for `facegate generate`: calls Generate and writes the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.tls import open_channel

_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG}
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg"}


def generate_to_folder(
    *,
    target: str,
    count: int,
    seed: int | None,
    out: Path,
    image_format: str = "png",
    timeout: float = 120.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> dict[str, Any]:
    request = pb.GenerateRequest(count=count, format=_FORMATS[image_format])
    if seed is not None:
        request.seed = seed
    channel = open_channel(
        target, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name
    )
    with channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            response = stub.Generate(request, timeout=timeout)
        except grpc.RpcError as err:
            return {"status": err.code().name, "message": err.details(), "written": []}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image in response.images:
        path = out / f"{image.slot:04d}{_SUFFIX.get(image.media_type, '.bin')}"
        path.write_bytes(image.data)
        written.append({"path": str(path), "attempts": image.attempts})
    s = response.summary
    return {
        "status": "OK",
        "request_id": s.request_id,
        "seed": s.seed,
        "requested": s.requested,
        "released": s.released,
        "candidates_drawn": s.candidates_drawn,
        "candidates_rejected": s.candidates_rejected,
        "slots_unfilled": s.slots_unfilled,
        "written": written,
    }
