"""Candidates across requests, batched: the dynamic batcher that feeds the engine
(`service.engine`, which generates and filters a batch) from the event loop without
blocking it.

The batcher is the one place where requests meet; it keeps a fault in one request's
candidates from failing its neighbours, and fails every waiting request closed if it
dies itself. What travels through it are draws, rows of (seed, slot, attempt, delivery),
not latents (`service.engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from filter.overlap import keep_thread_count
from service.engine import CandidateEngine, CandidateOutcome, filter_images
from service.errors import FilterFailure

log = logging.getLogger(__name__)


def _split(draws: np.ndarray, max_images: int) -> list[np.ndarray]:
    """`draws` in order, in parts of at most `max_images` filter images (one row at
    least)."""
    rows_per_part = max(1, max_images // (filter_images(draws[:1]) if len(draws) else 1))
    return [draws[i : i + rows_per_part] for i in range(0, len(draws), rows_per_part)] or [draws]


def _balanced(live: list[_Pending], parts: int) -> list[list[_Pending]]:
    """`live` in `parts` runs of whole requests, in order, each taking requests while they
    fit its share of the images left (none empty: `parts` is at most len(live))."""
    sizes = [filter_images(p.draws) for p in live]
    out: list[list[_Pending]] = []
    taken = 0
    for part in range(parts, 0, -1):
        share = (sum(sizes[taken:]) + part - 1) // part
        end, held = taken, 0
        # At least one request each, and one left for each part still to come.
        while end < len(live) - (part - 1) and (end == taken or held + sizes[end] <= share):
            held += sizes[end]
            end += 1
        out.append(live[taken:end])
        taken = end
    return out


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
    block the event loop. With `in_flight` 1 one batch runs at a time; with 2 (the
    default) on a GPU the next batch is generated and detected while the last is embedded
    and searched (the filter's stages pipeline), and on the CPU each batch runs in a lane
    of its own on its share of the cores (`filter.overlap`); each batch is still checked
    whole, so verdicts are unchanged. A slot is taken before a batch is gathered, so
    requests keep joining the next batch while the pipeline is full. With `spread` (lanes),
    a gathered batch of several requests is shared out, whole requests in order, over the
    lanes that are free when it closes: callers that all wait on one batch would otherwise
    leave the other lanes idle. A request whose future was cancelled (client gone, deadline) is
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
        spread: bool = False,
    ):
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.in_flight = in_flight
        self.spread = spread
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(
            max_workers=in_flight,
            thread_name_prefix="facegate-engine",
            initializer=keep_thread_count,
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
            extra = await self._free_slots(len(live) - 1) if self.spread else 0
            try:
                parts = [(live, draws)]
                if extra:
                    parts = [
                        (part, np.concatenate([p.draws for p in part]))
                        for part in _balanced(live, 1 + extra)
                    ]
            except BaseException:
                # The worker dies; its requests, still gathered, are failed closed
                # (_worker_ended) and no slot stays taken.
                for _ in range(1 + extra):
                    self._slots.release()
                raise
            self._gathered = []
            for part, part_draws in parts:
                batch = loop.create_task(
                    self._dispatch(loop, part, part_draws), name="filter-batch"
                )
                self._batches.add(batch)
                batch.add_done_callback(self._batches.discard)

    async def _free_slots(self, most: int) -> int:
        """Take up to `most` slots that are free now (never waiting): the lanes a closed
        batch is shared out over, besides its own (`spread`)."""
        taken = 0
        while taken < most and not self._slots.locked():
            await self._slots.acquire()  # free: returns at once
            taken += 1
        return taken

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
