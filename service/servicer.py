"""The gRPC servicer: protobuf <-> domain objects, admission, and the one place that
maps domain errors to status codes. Generation itself lives in service.pipeline
(batching in service.batcher)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from filter.errors import FilterError
from service.client_identity import peer_address
from service.encoding import ImageFormat
from service.errors import (
    DeadlineExceeded,
    FilterFailure,
    InvalidRequest,
    NothingPassed,
    NotReady,
    Overloaded,
    SigningFailure,
)
from service.metrics import ServiceMetrics
from service.pipeline import (
    GenerationPipeline,
    GenerationRequest,
    GenerationResult,
    GenerationSummary,
    ReleasedImage,
)
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.tls import MAX_MESSAGE_BYTES, client_subject

log = logging.getLogger(__name__)
T = TypeVar("T")

_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Domain error -> (status, caller-safe message). Unknown errors are INTERNAL and logged."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, NothingPassed):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, SigningFailure):
        log.error("content credentials failed; request failed closed: %s", exc, exc_info=exc)
        return (
            grpc.StatusCode.INTERNAL,
            "content credentials could not be signed; no image was released",
        )
    if isinstance(exc, (FilterFailure, FilterError)):
        # The message names only the failure class: no scores, paths or identities.
        log.error("identity filter failure; request failed closed: %s", exc, exc_info=exc)
        return grpc.StatusCode.INTERNAL, "identity filter failed; no image was released"
    log.error("unexpected error in Generate", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; no image was released"


class MalformedRequest:
    """Stands for request bytes that do not parse as a GenerateRequest."""


def parse_request(data: bytes) -> pb.GenerateRequest | MalformedRequest:
    """gRPC's own deserializer turns unparsable bytes into an unlogged UNKNOWN/INTERNAL;
    this one lets the servicer answer INVALID_ARGUMENT, counted like any other."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        return MalformedRequest()


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """pb_grpc.add_GenerationServiceServicer_to_server, with the tolerant deserializer."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=parse_request,
            response_serializer=pb.GenerateStreamResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


# A caller's own request id (x-request-id) is kept, for the operator, in the audit log
# only: never in the summary, never in the signed content credentials, which carry the
# server's id. What may be kept is narrow: an id, not a message.
CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def caller_request_id(metadata: Any) -> str | None:
    """The caller's x-request-id if it sent one; InvalidRequest unless it is 1-64
    characters of letters, digits and . _ : - (starting with a letter or digit)."""
    values = [str(value) for key, value in (metadata or ()) if key == "x-request-id"]
    if not values:
        return None
    if len(values) > 1 or not CALLER_REQUEST_ID.fullmatch(values[0]):
        raise InvalidRequest(
            "x-request-id must be one value of 1 to 64 characters: letters, digits and "
            ". _ : - (the server makes its own id; yours is kept in its audit log only)"
        )
    return values[0]


def to_domain(
    request: pb.GenerateRequest | MalformedRequest,
    client: str | None = None,
    caller_id: str | None = None,
) -> GenerationRequest:
    if isinstance(request, MalformedRequest):
        raise InvalidRequest("the request is not a valid facegate.v1.GenerateRequest")
    image_format = _FORMATS.get(request.format)
    if image_format is None:
        raise InvalidRequest(f"unknown image format {request.format}")
    return GenerationRequest(
        count=request.count,
        seed=request.seed if request.HasField("seed") else None,
        image_format=image_format,
        jpeg_quality=request.jpeg_quality or None,
        client=client,
        caller_request_id=caller_id,
    )


def image_to_proto(image: ReleasedImage) -> pb.GeneratedImage:
    return pb.GeneratedImage(
        data=image.data,
        media_type=image.media_type,
        attempts=image.attempts,
        slot=image.slot,
        width=image.width,
        height=image.height,
    )


def summary_to_proto(summary: GenerationSummary) -> pb.GenerateSummary:
    return pb.GenerateSummary(
        requested=summary.requested,
        released=summary.released,
        candidates_drawn=summary.candidates_drawn,
        candidates_rejected=summary.candidates_rejected,
        slots_unfilled=summary.slots_unfilled,
        seed=summary.seed,
        request_id=summary.request_id,
    )


def result_to_proto(result: GenerationResult) -> pb.GenerateResponse:
    """The unary response; InvalidRequest if it is larger than a response may be (large
    frames times a large count): gRPC would otherwise fail the send after the work, with
    RESOURCE_EXHAUSTED, which reads as "retry later" though a retry fails alike."""
    response = pb.GenerateResponse(
        images=[image_to_proto(img) for img in result.images],
        summary=summary_to_proto(result.summary),
    )
    size = response.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        raise InvalidRequest(
            f"{len(result.images)} images make a {size}-byte response, over the "
            f"{MAX_MESSAGE_BYTES} bytes a Generate response may carry: use GenerateStream "
            "(one image per message) or a lower count"
        )
    return response


class Admission:
    """Concurrency cap without a hidden queue, and the ready/draining state."""

    def __init__(
        self,
        max_concurrent: int,
        metrics: ServiceMetrics,
        max_per_client: int = 0,
        client_limits: dict[str, int] | None = None,
        max_per_peer: int = 0,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_per_client = max_per_client  # per client-certificate subject; 0: no limit
        self.client_limits = dict(client_limits or {})  # a subject's own limit
        # Per peer address for calls without a client certificate; 0: no limit. Behind a
        # load balancer or NAT every call shares one address, and so one budget.
        self.max_per_peer = max_per_peer
        self.metrics = metrics
        self.ready = False
        self.draining = False
        self.inflight = 0
        self.per_client: dict[str, int] = {}

    def budget(self, client: str | None, peer: str | None = None) -> tuple[str | None, int]:
        """Whose budget a call draws on, and its limit (0: none): the verified subject's
        under mutual TLS, else the peer address's."""
        if client is not None:
            return client, self.client_limits.get(client, self.max_per_client)
        if peer is not None and self.max_per_peer:
            return f"peer {peer}", self.max_per_peer
        return None, 0

    def enter(self, client: str | None = None, peer: str | None = None) -> None:
        if self.draining:
            raise NotReady("server is shutting down; retry on another replica")
        if not self.ready:
            raise NotReady("server is starting; models and index are not loaded yet")
        if self.inflight >= self.max_concurrent:
            raise Overloaded(
                f"server is at its limit of {self.max_concurrent} concurrent requests; retry later"
            )
        holder, limit = self.budget(client, peer)
        if holder is not None and limit:
            if self.per_client.get(holder, 0) >= limit:
                raise Overloaded(f"this client is at its limit of {limit} concurrent requests")
            self.per_client[holder] = self.per_client.get(holder, 0) + 1
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def leave(self, client: str | None = None, peer: str | None = None) -> None:
        holder, _ = self.budget(client, peer)
        if holder is not None and holder in self.per_client:
            self.per_client[holder] -= 1
            if not self.per_client[holder]:
                del self.per_client[holder]
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        pipeline: GenerationPipeline | None,
        admission: Admission,
        metrics: ServiceMetrics,
        max_request_seconds: float = 60.0,
    ) -> None:
        self.pipeline = pipeline
        self.admission = admission
        self.metrics = metrics
        self.max_request_seconds = max_request_seconds

    def _domain_request(self, request: pb.GenerateRequest, context: Any) -> GenerationRequest:
        caller_id = caller_request_id(context.invocation_metadata())
        return to_domain(request, client_subject(context), caller_id)

    def _budget(self, context: Any) -> float:
        """Seconds this call may run: the caller's deadline, never past the server's bound."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.max_request_seconds
        return max(0.0, min(self.max_request_seconds, remaining))

    async def _bounded(
        self, context: Any, body: Callable[[GenerationPipeline, float], Awaitable[T]]
    ) -> T:
        """Run the body within the budget; a stalled stream write is bounded too."""
        if self.pipeline is None:
            raise NotReady("server is starting; models and index are not loaded yet")
        budget = self._budget(context)
        timeout = asyncio.timeout(budget)
        try:
            async with timeout:
                return await body(self.pipeline, time.monotonic() + budget)
        except TimeoutError:
            if not timeout.expired():
                raise
            raise DeadlineExceeded(
                f"the call did not finish within its deadline ({budget:.1f} s at most)"
            ) from None

    async def _guarded(
        self,
        method: str,
        context: Any,
        body: Callable[[GenerationPipeline, float], Awaitable[T]],
    ) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        failure: tuple[grpc.StatusCode, str] | None = None
        client = client_subject(context)
        peer = peer_address(context.peer()) if client is None else None
        try:
            self.admission.enter(client, peer)
            try:
                return await self._bounded(context, body)
            finally:
                self.admission.leave(client, peer)
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller cancels and when the caller's
            # deadline passes; the label tells the two apart.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0.01
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            failure = status_for(exc)
            code = failure[0]
            if isinstance(exc, NothingPassed) and isinstance(exc.summary, GenerationSummary):
                s = exc.summary
                context.set_trailing_metadata(
                    (
                        ("facegate-candidates-drawn", str(s.candidates_drawn)),
                        ("facegate-slots-unfilled", str(s.slots_unfilled)),
                        ("facegate-seed", str(s.seed)),
                    )
                )
        finally:
            self.metrics.request_done(method, code.name, time.perf_counter() - start)
        assert failure is not None
        await context.abort(failure[0], failure[1])
        raise AssertionError("unreachable: abort raises")

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        async def body(pipeline: GenerationPipeline, deadline: float) -> pb.GenerateResponse:
            domain = self._domain_request(request, context)
            result = await pipeline.generate(domain, deadline=deadline)
            return result_to_proto(result)

        return await self._guarded("Generate", context, body)

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any) -> None:
        # A coroutine using context.write (not an async generator), so that images go out
        # as they pass and errors still map through _guarded.
        async def on_image(image: ReleasedImage) -> None:
            await context.write(pb.GenerateStreamResponse(image=image_to_proto(image)))

        async def body(pipeline: GenerationPipeline, deadline: float) -> None:
            domain = self._domain_request(request, context)
            result = await pipeline.generate(domain, deadline=deadline, on_image=on_image)
            await context.write(pb.GenerateStreamResponse(summary=summary_to_proto(result.summary)))

        await self._guarded("GenerateStream", context, body)
