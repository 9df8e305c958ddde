"""Slots, candidates and resampling: the gRPC-free core of Generate.

A request asks for `count` slots. Each round, every open slot draws one candidate
(latent = f(seed, slot, attempt)); the candidates of all open requests are
generated and filtered together by the batcher; passing candidates fill their
slots, rejected ones are resampled until the attempt budget runs out. Only images
that passed the filter are ever encoded or returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from filter.decide import ImageVerdict, Reason
from filter.identity_filter import StageObserver
from service.audit import AuditSink, NullAuditLog, Rejection
from service.errors import DeadlineExceeded, FilterFailure, InvalidRequest, NothingPassed
from service.generators import Generator, latents_for

log = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1


class ImageFormat(enum.StrEnum):
    PNG = "png"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"


@dataclass(frozen=True)
class GenerationRequest:
    count: int
    seed: int | None = None
    image_format: ImageFormat = ImageFormat.PNG
    jpeg_quality: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None  # verified client-certificate subject (mutual TLS)


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


@dataclass(frozen=True)
class Candidate:
    slot: int
    attempt: int
    latent: np.ndarray


@dataclass(frozen=True)
class CandidateOutcome:
    image: np.ndarray
    verdict: ImageVerdict


class PipelineObserver(Protocol):
    def observe_stage(self, stage: str, seconds: float) -> None: ...
    def candidate(self, verdict: ImageVerdict) -> None: ...
    def released(self, attempts: int) -> None: ...
    def unfilled(self, slots: int) -> None: ...
    def batch(self, size: int) -> None: ...


class NullObserver:
    def observe_stage(self, stage: str, seconds: float) -> None:
        return None

    def candidate(self, verdict: ImageVerdict) -> None:
        return None

    def released(self, attempts: int) -> None:
        return None

    def unfilled(self, slots: int) -> None:
        return None

    def batch(self, size: int) -> None:
        return None


class ImageChecker(Protocol):
    """What the engine needs of the identity filter (filter.IdentityFilter implements it)."""

    def check(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageVerdict]: ...


class CandidateEngine:
    """Generates and filters a batch of candidates, synchronously (run off the loop)."""

    def __init__(
        self,
        generator: Generator,
        identity_filter: ImageChecker,
        observer: PipelineObserver | None = None,
    ) -> None:
        self.generator = generator
        self.identity_filter = identity_filter
        self.observer = observer or NullObserver()

    def run(self, latents: np.ndarray) -> list[CandidateOutcome]:
        start = time.perf_counter()
        images = self.generator.generate(latents)
        self.observer.observe_stage("generate", time.perf_counter() - start)
        if len(images) != len(latents):
            raise FilterFailure(
                f"generator returned {len(images)} images for {len(latents)} latents"
            )
        batch = list(images)
        verdicts = self.identity_filter.check(batch, observer=self.observer)
        if len(verdicts) != len(batch):
            raise FilterFailure("filter returned a verdict count that differs from its input")
        self.observer.batch(len(batch))
        return [
            CandidateOutcome(image=img, verdict=v) for img, v in zip(batch, verdicts, strict=True)
        ]


@dataclass
class _Pending:
    latents: np.ndarray
    future: asyncio.Future[list[CandidateOutcome]]


class DynamicBatcher:
    """Gathers candidates across requests into batches, like Triton's dynamic batcher.

    A batch closes when it holds `max_batch` candidates or `max_delay` seconds have
    passed since its first entry. One worker thread runs the engine, so torch and
    FAISS never block the event loop and never compete with each other for cores.
    A request whose future was cancelled (client gone, deadline) is dropped before
    its candidates are drawn. When a batch of several requests fails, each request is
    retried alone once, so only the request whose candidate fails is failed (closed).
    """

    def __init__(self, engine: CandidateEngine, max_batch: int = 64, max_delay: float = 0.005):
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facegate-engine")
        self._worker: asyncio.Task[None] | None = None
        self._gathered: list[_Pending] = []  # taken from the queue, not yet answered
        self._carry: _Pending | None = None  # taken, too big for the batch, opens the next

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
            self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """If the worker dies of a bug, fail every waiting request closed, now."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher worker crashed; failing queued requests", exc_info=task.exception())
        self._worker = None  # the next submit starts a fresh worker
        waiting = [*self._gathered, *([self._carry] if self._carry else [])]
        self._carry = None
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(FilterFailure("batcher worker crashed"))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, latents: np.ndarray) -> list[CandidateOutcome]:
        self.start()
        future: asyncio.Future[list[CandidateOutcome]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(latents, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry or await self._queue.get()
            self._carry = None
            batch = self._gathered = [first]
            size = len(first.latents)
            deadline = loop.time() + self.max_delay
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if size + len(item.latents) > self.max_batch and size > 0:
                    self._carry = item
                    break
                batch.append(item)
                size += len(item.latents)
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            latents = np.concatenate([p.latents for p in live])
            try:
                outcomes = await loop.run_in_executor(self._executor, self.engine.run, latents)
            except asyncio.CancelledError:
                for p in live:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as exc:
                if len(live) == 1:
                    log.exception("filter batch failed; failing its request closed")
                    _fail(live[0], exc)
                    continue
                # Isolate the fault: one request's candidate must not fail its neighbours
                # (seeds are caller-chosen and replayable). Each request runs alone once;
                # only the one whose candidates fail again gets INTERNAL.
                log.warning(
                    "filter batch of %d requests failed (%s); retrying each request alone",
                    len(live),
                    type(exc).__name__,
                )
                try:
                    for p in live:
                        await self._run_alone(loop, p)
                except asyncio.CancelledError:
                    for p in live:
                        if not p.future.done():
                            p.future.cancel()
                    raise
                continue
            offset = 0
            for p in live:
                part = outcomes[offset : offset + len(p.latents)]
                offset += len(p.latents)
                if not p.future.done():
                    p.future.set_result(part)

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            outcomes = await loop.run_in_executor(self._executor, self.engine.run, pending.latents)
        except Exception as exc:
            log.exception("filter failed on one request's candidates alone; failing it closed")
            _fail(pending, exc)
            return
        if not pending.future.done():
            pending.future.set_result(outcomes)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(FilterFailure(f"identity filter failed: {type(exc).__name__}"))


def encode_image(image: np.ndarray, image_format: ImageFormat, jpeg_quality: int) -> bytes:
    """Encode deterministically: no timestamps or metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format is ImageFormat.PNG:
        pil.save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        pil.save(buffer, format="JPEG", quality=jpeg_quality, optimize=False)
    return buffer.getvalue()


ImageCallback = Callable[[ReleasedImage], Awaitable[None]]


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
        seed_key: bytes | None = None,
    ) -> None:
        self.batcher = batcher
        self.seed_key = seed_key
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
        released: list[ReleasedImage] = []
        open_slots = list(range(request.count))
        attempts = dict.fromkeys(open_slots, 0)
        while open_slots:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline exceeded before the slots were filled")
            candidates = [
                Candidate(
                    slot,
                    attempts[slot],
                    latents_for(seed, slot, attempts[slot], self.latent_dim, self.seed_key),
                )
                for slot in open_slots
            ]
            outcomes = await self.batcher.submit(np.stack([c.latent for c in candidates]))
            still_open: list[int] = []
            for candidate, outcome in zip(candidates, outcomes, strict=True):
                attempts[candidate.slot] += 1
                summary.candidates_drawn += 1
                self.observer.candidate(outcome.verdict)
                if outcome.verdict.passed:
                    # Encoding a large generator's output takes tens of ms: off the loop.
                    data = await asyncio.to_thread(
                        encode_image, outcome.image, request.image_format, quality
                    )
                    image = ReleasedImage(
                        slot=candidate.slot,
                        data=data,
                        media_type=request.image_format.media_type,
                        attempts=attempts[candidate.slot],
                        width=int(outcome.image.shape[1]),
                        height=int(outcome.image.shape[0]),
                    )
                    released.append(image)
                    self.observer.released(image.attempts)
                    if on_image is not None:
                        await on_image(image)
                    continue
                summary.candidates_rejected += 1
                self.audit.rejection(
                    Rejection(
                        request_id=request.request_id,
                        slot=candidate.slot,
                        attempt=candidate.attempt,
                        reason=str(outcome.verdict.reason or Reason.FILTER_ERROR),
                        similarity=outcome.verdict.max_similarity,
                        identity=outcome.verdict.identity,
                        faces=outcome.verdict.faces,
                        client=request.client,
                    )
                )
                if attempts[candidate.slot] < self.max_attempts:
                    still_open.append(candidate.slot)
            open_slots = still_open
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


_OUTCOME_BY_REASON = {
    Reason.IDENTITY_MATCH: "rejected_identity",
    Reason.REPLICA: "rejected_replica",
    Reason.NO_FACE: "rejected_no_face",
}


def verdict_outcome(verdict: ImageVerdict) -> str:
    """Metric label of a candidate: accepted, rejected_identity, rejected_replica,
    rejected_no_face, or rejected_error (anything the filter could not vouch for)."""
    if verdict.passed:
        return "accepted"
    if verdict.reason is None:
        return "rejected_error"
    return _OUTCOME_BY_REASON.get(verdict.reason, "rejected_error")
