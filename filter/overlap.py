"""Overlap of the filter's stages across batches: a pipeline of threads.

The filter's stages (detect and align, embed, search) each serve one batch at a time
(`filter.identity_filter.FaceEmbeddingPipeline`), so keeping two batches in flight makes a
pipeline: while one batch is embedded, the next is detected. Every batch is still checked
whole and alone, by the same code, so its verdicts are those of a serial run.

On a GPU this hides each stage's host work (Python, NMS bookkeeping, alignment, FAISS)
behind the other stages' kernels; each thread computes on its own CUDA stream, so one
batch's synchronisations wait only for its own kernels. On 2 CPU cores the stages already
use every core, so the default there is one batch at a time (README "Performance").
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# Batches in flight when the setting is 0 (auto): overlap on a GPU, none on the CPU.
AUTO_IN_FLIGHT = {"cuda": 2, "cpu": 1}

_local = threading.local()


def batches_in_flight(setting: int, device: torch.device | str) -> int:
    """The number of filter batches to keep in flight: the setting, or for 0 the default
    of the device's kind."""
    if setting > 0:
        return setting
    return AUTO_IN_FLIGHT.get(torch.device(device).type, 1)


def thread_stream(device: torch.device | str) -> AbstractContextManager[Any]:
    """This thread's own CUDA stream on `device` (made once per thread), or nothing for the
    CPU. Tensors never cross streams here: each batch is uploaded, computed and read back
    in the thread that checks it; the models' weights and the index are read-only."""
    device = torch.device(device)
    if device.type != "cuda":
        return nullcontext()
    streams: dict[torch.device, torch.cuda.Stream] = getattr(_local, "streams", None) or {}
    _local.streams = streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    stream = streams[device]
    # Work queued before on the thread's current stream (the models' and the index's
    # uploads, on the default stream) completes before this batch's kernels read it.
    stream.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(stream)


def overlapped(fn: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """fn(item) for each item, results in input order, with up to `depth` calls running at
    once in worker threads. Depth 1 is a plain loop in the caller's thread. An exception
    is raised where its item's result would have been yielded; calls already started
    finish first (none is abandoned half-way)."""
    if depth <= 1:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="facegate-overlap") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
