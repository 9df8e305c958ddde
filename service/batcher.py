"""Candidates across requests, batched: the engine that generates and filters a batch,
and the dynamic batcher that feeds it from the event loop without blocking it.

The batcher is the one place where requests meet; it keeps a fault in one request's
candidates from failing its neighbours, and fails every waiting request closed if it
dies itself.

What travels through the batcher are draws, rows of (seed, slot, attempt, delivery), not
latents: the engine reads the filter in force once per batch and derives each latent under
that filter's index salt (service.generators.latents_for), so the candidate drawn and the
filter that checks it always belong to the same index, also across a hot reload. A JPEG
delivery is encoded before the check, and both the generated and the decoded pixels are
checked (service.encoding.deliver).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

import numpy as np

from filter.decide import ImageVerdict, verdict_rank
from filter.identity_filter import StageObserver
from filter.stages import GENERATE
from filter.thresholds import FilterInForce
from service.encoding import deliver
from service.errors import FilterFailure
from service.generators import LOSSLESS, Generator, latents_for_draws

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateOutcome:
    image: np.ndarray
    verdict: ImageVerdict
    # The index and thresholds this candidate was checked against; None when the checker
    # does not say (a content signer then refuses to vouch for it).
    filtered_by: FilterInForce | None = None
    # The lossy bytes whose decoded pixels (`image`) were checked (service.encoding.deliver);
    # None for a lossless delivery.
    delivered: bytes | None = None


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
    """What the engine needs of the identity filter (filter.IdentityFilter implements it).
    `candidates[i]`: the candidate image i shows (a JPEG candidate's two views share one),
    for what is counted per candidate (filter.shadow); None: one candidate per image."""

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]: ...


@dataclass(frozen=True)
class FilterSnapshot:
    """The filter in force for one batch, read in one step: the checker, what it was loaded
    from (index fingerprint, thresholds; None when unknown) and its index's salt."""

    checker: ImageChecker
    in_force: FilterInForce | None = None
    salt: bytes = b""


@runtime_checkable
class SnapshotSource(Protocol):
    """A filter that can change between batches (service.reload.SwappableChecker)."""

    def snapshot(self) -> FilterSnapshot: ...


class CandidateEngine:
    """Draws, generates and filters a batch of candidates, synchronously (run off the loop).

    `seed_key` keys the latents (FACEGATE_SEED_KEY_FILE); the salt comes with the filter
    snapshot taken for the batch."""

    def __init__(
        self,
        generator: Generator,
        identity_filter: ImageChecker,
        observer: PipelineObserver | None = None,
        seed_key: bytes | None = None,
    ) -> None:
        self.generator = generator
        self.identity_filter = identity_filter
        self.observer = observer or NullObserver()
        self.seed_key = seed_key

    def snapshot(self) -> FilterSnapshot:
        if isinstance(self.identity_filter, SnapshotSource):
            return self.identity_filter.snapshot()
        return FilterSnapshot(self.identity_filter)

    def run(self, draws: np.ndarray) -> list[CandidateOutcome]:
        """`draws`: (N, 4) rows of (seed, slot, attempt, delivery); one outcome per row, in
        order. A lossy (JPEG) candidate is checked twice in the same batch, as generated
        and as its caller will decode it, and passes only if both pass: the decoded pixels
        are what leaves, and a caller choosing the quality must not blur an enrolled face
        under the threshold."""
        snapshot = self.snapshot()  # the whole batch is drawn for, and checked by, one filter
        latents = latents_for_draws(draws, self.generator.latent_dim, self.seed_key, snapshot.salt)
        start = time.perf_counter()
        images = self.generator.generate(latents)
        if len(images) != len(latents):
            raise FilterFailure(
                f"generator returned {len(images)} images for {len(latents)} latents"
            )
        deliveries = [
            deliver(image, int(quality))
            for image, quality in zip(images, np.asarray(draws)[:, 3].tolist(), strict=True)
        ]
        self.observer.observe_stage(GENERATE, time.perf_counter() - start)
        lossy = [row for row, (_, data) in enumerate(deliveries) if data is not None]
        batch = [*images, *(deliveries[row][0] for row in lossy)]
        candidates = [*range(len(images)), *lossy]
        verdicts = snapshot.checker.check(batch, observer=self.observer, candidates=candidates)
        if len(verdicts) != len(batch):
            raise FilterFailure("filter returned a verdict count that differs from its input")
        final = list(verdicts[: len(images)])
        for row, as_delivered in zip(lossy, verdicts[len(images) :], strict=True):
            final[row] = min((final[row], as_delivered), key=verdict_rank)
        self.observer.batch(len(images))
        return [
            CandidateOutcome(image=pixels, verdict=v, filtered_by=snapshot.in_force, delivered=data)
            for (pixels, data), v in zip(deliveries, final, strict=True)
        ]


def filter_images(draws: np.ndarray) -> int:
    """How many images the filter checks for these draws: a lossy (JPEG) candidate is
    checked twice (CandidateEngine.run)."""
    return len(draws) + int(np.count_nonzero(np.asarray(draws)[:, 3] != LOSSLESS))


def _split(draws: np.ndarray, max_images: int) -> list[np.ndarray]:
    """`draws` in order, in parts of at most `max_images` filter images (one row at
    least)."""
    rows_per_part = max(1, max_images // (filter_images(draws[:1]) if len(draws) else 1))
    return [draws[i : i + rows_per_part] for i in range(0, len(draws), rows_per_part)] or [draws]


@dataclass(eq=False)
class _Pending:
    draws: np.ndarray
    future: asyncio.Future[list[CandidateOutcome]]
    # The request's parts, this one included: a failed part cancels the others at once,
    # before the worker can take the next one from the queue.
    parts: list[_Pending] = field(default_factory=list, repr=False)


class DynamicBatcher:
    """Gathers candidates across requests into batches, like Triton's dynamic batcher.

    A batch closes when it holds `max_batch` candidates or `max_delay` seconds have
    passed since its first entry. Worker threads run the engine, so torch and FAISS never
    block the event loop. With `in_flight` 1 (the CPU's default) one batch runs at a time,
    never competing with another for cores; with 2 (a GPU's), the next batch is generated
    and detected while the last is embedded and searched: the filter's stages pipeline
    (`filter.overlap`), each batch still checked whole, so verdicts are unchanged. A slot
    is taken before a batch is gathered, so requests keep joining the next batch while
    the pipeline is full. A request whose future was cancelled (client gone, deadline) is
    dropped before its candidates are drawn. When a batch of several requests fails, each
    request is retried alone once, so only the request whose candidate fails is failed
    (closed).
    """

    def __init__(
        self,
        engine: CandidateEngine,
        max_batch: int = 64,
        max_delay: float = 0.005,
        in_flight: int = 1,
    ):
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.in_flight = in_flight
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(
            max_workers=in_flight, thread_name_prefix="facegate-engine"
        )
        self._slots = asyncio.Semaphore(in_flight)
        self._worker: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # dispatched, running (in_flight > 1)
        self._gathered: list[_Pending] = []  # taken from the queue, not yet dispatched
        self._carry: _Pending | None = None  # taken, too big for the batch, opens the next

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
            self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """If the worker dies of a bug, fail every waiting request closed, now. Batches
        already dispatched finish on their own (and fail closed on their own)."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher worker crashed; failing queued requests", exc_info=task.exception())
        self._worker = None  # the next submit starts a fresh worker
        waiting = [*self._gathered, *([self._carry] if self._carry else [])]
        self._gathered = []
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
        for batch in list(self._batches):
            batch.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, draws: np.ndarray) -> list[CandidateOutcome]:
        """`draws`: (N, 4) rows of (seed, slot, attempt, delivery)
        (service.generators.draw_rows). A request larger than a batch goes in parts, so
        that no filter call holds more than `max_batch` images, whatever one caller asks."""
        self.start()
        loop = asyncio.get_running_loop()
        parts = [_Pending(part, loop.create_future()) for part in _split(draws, self.max_batch)]
        for pending in parts:
            pending.parts = parts
        futures = [pending.future for pending in parts]
        try:
            for pending in parts:
                await self._queue.put(pending)
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # A failed part fails the request: its other parts are not filtered for nothing
            # (and a cancelled request's parts leave the queue unfiltered).
            for future in futures:
                if not future.done():
                    future.cancel()
        for future in futures:
            if not future.cancelled() and future.exception() is not None:
                raise cast(BaseException, future.exception())
        return [outcome for future in futures for outcome in future.result()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                gathered = await self._gather(loop)
            except BaseException:
                self._slots.release()
                raise
            if gathered is None:
                self._slots.release()
                continue
            live, draws = gathered
            if self.in_flight == 1:
                await self._dispatch(loop, live, draws)
                continue
            self._gathered = []
            batch = loop.create_task(self._dispatch(loop, live, draws), name="filter-batch")
            self._batches.add(batch)
            batch.add_done_callback(self._batches.discard)

    async def _gather(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[_Pending], np.ndarray] | None:
        """The next batch's live requests and their draws (None: all were cancelled)."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch = self._gathered = [first]
        size = filter_images(first.draws)
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
            if size + filter_images(item.draws) > self.max_batch and size > 0:
                self._carry = item
                break
            batch.append(item)
            size += filter_images(item.draws)
        live = [p for p in batch if not p.future.done()]
        if not live:
            return None
        return live, np.concatenate([p.draws for p in live])

    async def _dispatch(
        self, loop: asyncio.AbstractEventLoop, live: list[_Pending], draws: np.ndarray
    ) -> None:
        """Run one batch and answer its requests; frees its slot in the pipeline."""
        try:
            await self._answer(loop, live, draws)
        except asyncio.CancelledError:
            for p in live:
                if not p.future.done():
                    p.future.cancel()
            raise
        except Exception as exc:  # a bug here must not leave a request waiting
            log.exception("filter batch dispatch crashed; failing its requests closed")
            for p in live:
                _fail(p, exc)
        finally:
            self._slots.release()

    async def _answer(
        self, loop: asyncio.AbstractEventLoop, live: list[_Pending], draws: np.ndarray
    ) -> None:
        try:
            outcomes = await loop.run_in_executor(self._executor, self.engine.run, draws)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(live) == 1:
                log.exception("filter batch failed; failing its request closed")
                _fail(live[0], exc)
                return
            # Isolate the fault: one request's candidate must not fail its neighbours
            # (seeds are caller-chosen and replayable). Each request runs alone once;
            # only the one whose candidates fail again gets INTERNAL.
            # With its traceback: if every request then passes alone, this is the only
            # trace of the fault.
            log.warning(
                "filter batch of %d requests failed (%s); retrying each request alone",
                len(live),
                type(exc).__name__,
                exc_info=exc,
            )
            for p in live:
                await self._run_alone(loop, p)
            return
        offset = 0
        for p in live:
            part = outcomes[offset : offset + len(p.draws)]
            offset += len(p.draws)
            if not p.future.done():
                p.future.set_result(part)

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            outcomes = await loop.run_in_executor(self._executor, self.engine.run, pending.draws)
        except Exception as exc:
            log.exception("filter failed on one request's candidates alone; failing it closed")
            _fail(pending, exc)
            return
        if not pending.future.done():
            pending.future.set_result(outcomes)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(FilterFailure(f"identity filter failed: {type(exc).__name__}"))
    for sibling in pending.parts:
        if not sibling.future.done():
            sibling.future.cancel()
