"""Slots, candidates and resampling: the gRPC-free core of Generate.

A request asks for `count` slots. Each round, every open slot draws one candidate
(seed, slot, attempt, and how it will be delivered; the engine derives its latent under
the seed key and the salt of the index that checks it); the candidates of all open
requests are generated and filtered together by the batcher; passing candidates fill
their slots, rejected ones are resampled until the attempt budget runs out. Only images
that passed the filter are ever returned; a JPEG candidate is encoded (in memory) before
the check, so that its decoded pixels are checked too, and dropped if rejected.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from filter.decide import Reason
from service.audit import AuditSink, NullAuditLog, Rejection
from service.batcher import DynamicBatcher
from service.encoding import ContentSigner, ImageFormat, encode_released
from service.engine import NullObserver, PipelineObserver
from service.errors import DeadlineExceeded, InvalidRequest, NothingPassed
from service.generators import LOSSLESS, draw_rows
from service.provenance import ReleaseFacts

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class GenerationRequest:
    count: int
    seed: int | None = None
    image_format: ImageFormat = ImageFormat.PNG
    jpeg_quality: int | None = None
    # Made by the server for this call: the summary, the audit log and the content
    # credentials name it. Never the caller's own id (which goes to the audit log only).
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None  # verified client-certificate subject (mutual TLS)
    caller_request_id: str | None = None  # the caller's x-request-id, validated


@dataclass(frozen=True)
class ReleasedImage:
    slot: int
    data: bytes
    media_type: str
    attempts: int
    width: int
    height: int


@dataclass
class GenerationSummary:
    requested: int
    seed: int
    request_id: str
    released: int = 0
    candidates_drawn: int = 0
    candidates_rejected: int = 0
    slots_unfilled: int = 0


@dataclass
class GenerationResult:
    images: list[ReleasedImage]
    summary: GenerationSummary


ImageCallback = Callable[[ReleasedImage], Awaitable[None]]

# What a unary response holds beside the images' bytes, at most: each image's protobuf
# fields and framing, and the summary's without its request id
# (tests/unit/test_status_for.py). A result within the bound is never refused as too large
# after its images were counted released.
IMAGE_FRAMING_BYTES = 64
SUMMARY_FRAMING_BYTES = 96


class GenerationPipeline:
    """Fills a request's slots with filtered images, resampling rejected candidates."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        latent_dim: int,
        *,
        max_attempts: int,
        max_count: int,
        jpeg_quality: int = 90,
        observer: PipelineObserver | None = None,
        audit: AuditSink | None = None,
        signer: ContentSigner | None = None,
        max_result_bytes: int | None = None,
    ) -> None:
        self.batcher = batcher
        # The image bytes one result (without on_image) may hold: a unary response larger
        # than its transport carries fails anyway, so the work stops once it must.
        self.max_result_bytes = max_result_bytes
        self.signer = signer  # None: images carry no content credentials
        self.latent_dim = latent_dim
        self.max_attempts = max_attempts
        self.max_count = max_count
        self.jpeg_quality = jpeg_quality
        self.observer = observer or NullObserver()
        self.audit = audit or NullAuditLog()

    def validate(self, request: GenerationRequest) -> None:
        if not 1 <= request.count <= self.max_count:
            raise InvalidRequest(
                f"count must be between 1 and {self.max_count}; got {request.count}"
            )
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest("seed must fit in an unsigned 64-bit integer")
        if request.jpeg_quality is not None and not 1 <= request.jpeg_quality <= 100:
            raise InvalidRequest(
                f"jpeg_quality must be between 1 and 100; got {request.jpeg_quality}"
            )

    async def generate(
        self,
        request: GenerationRequest,
        *,
        deadline: float | None = None,
        on_image: ImageCallback | None = None,
    ) -> GenerationResult:
        """Run the request. `deadline` is a time.monotonic() value; None means no deadline."""
        self.validate(request)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        summary = GenerationSummary(
            requested=request.count, seed=seed, request_id=request.request_id
        )
        quality = request.jpeg_quality or self.jpeg_quality
        # JPEG candidates are checked as decoded from the very bytes that will leave.
        delivery = quality if request.image_format is ImageFormat.JPEG else LOSSLESS
        released: list[ReleasedImage] = []
        result_bytes = SUMMARY_FRAMING_BYTES + len(request.request_id)
        open_slots = list(range(request.count))
        attempts = dict.fromkeys(open_slots, 0)
        while open_slots:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline exceeded before the slots were filled")
            candidates = [(slot, attempts[slot]) for slot in open_slots]
            outcomes = await self.batcher.submit(draw_rows(seed, candidates, delivery))
            still_open: list[int] = []
            for (slot, attempt), outcome in zip(candidates, outcomes, strict=True):
                attempts[slot] += 1
                summary.candidates_drawn += 1
                self.observer.candidate(outcome.verdict)
                if outcome.verdict.passed:
                    # Encoding (and signing) takes milliseconds to tens of ms: off the loop.
                    # A signing failure raises here, before the image is kept or streamed.
                    facts = (
                        ReleaseFacts(request.request_id, outcome.filtered_by)
                        if outcome.filtered_by is not None
                        else None
                    )
                    data = await asyncio.to_thread(
                        encode_released,
                        outcome.image,
                        request.image_format,
                        quality,
                        self.signer,
                        facts,
                        outcome.delivered,
                    )
                    image = ReleasedImage(
                        slot=slot,
                        data=data,
                        media_type=request.image_format.media_type,
                        attempts=attempts[slot],
                        width=int(outcome.image.shape[1]),
                        height=int(outcome.image.shape[0]),
                    )
                    released.append(image)
                    if on_image is not None:
                        self.observer.released(image.attempts)
                        await on_image(image)
                        continue
                    result_bytes += len(data) + IMAGE_FRAMING_BYTES
                    if self.max_result_bytes is not None and result_bytes > self.max_result_bytes:
                        raise InvalidRequest(
                            f"{len(released)} images already need about {result_bytes} bytes, over "
                            f"the {self.max_result_bytes} bytes one response may carry: "
                            "stream them (GenerateStream, one image per message) or ask for "
                            "fewer"
                        )
                    continue
                summary.candidates_rejected += 1
                self.audit.rejection(
                    Rejection(
                        request_id=request.request_id,
                        slot=slot,
                        attempt=attempt,
                        reason=str(outcome.verdict.reason or Reason.FILTER_ERROR),
                        similarity=outcome.verdict.max_similarity,
                        identity=outcome.verdict.identity,
                        faces=outcome.verdict.faces,
                        client=request.client,
                        caller_request_id=request.caller_request_id,
                        replica_similarity=outcome.verdict.replica_similarity,
                    )
                )
                if attempts[slot] < self.max_attempts:
                    still_open.append(slot)
            open_slots = still_open
        if on_image is None:
            # Counted once the result is whole: a result refused above released nothing.
            for image in released:
                self.observer.released(image.attempts)
        released.sort(key=lambda img: img.slot)
        summary.released = len(released)
        summary.slots_unfilled = request.count - len(released)
        if summary.slots_unfilled:
            self.observer.unfilled(summary.slots_unfilled)
        if not released:
            raise NothingPassed(
                f"no candidate passed the identity filter within {self.max_attempts} attempts "
                f"per slot ({summary.candidates_drawn} drawn)",
                summary,
            )
        return GenerationResult(images=released, summary=summary)
