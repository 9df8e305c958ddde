"""Overlap of the filter's work across batches: a pipeline of threads, or lanes.

The filter's stages (detect and align, embed, search) each serve one batch at a time
(`filter.identity_filter.FaceEmbeddingPipeline`), so keeping two batches in flight makes a
pipeline: while one batch is embedded, the next is detected. Every batch is still checked
whole and alone, by the same code, so its verdicts are those of a serial run.

On a GPU this hides each stage's host work (Python, NMS bookkeeping, alignment, FAISS)
behind the other stages' kernels; each thread computes on its own CUDA stream, so one
batch's synchronisations wait only for its own kernels.

On the CPU the batches in flight run in lanes instead: each batch detected and embedded
on its own networks and embedder, on its own share of the cores (`share_cores`).
Detection's small tensor programs scale poorly over threads (about 1.2x on two cores,
where the embedder gives 2x), so whole batches side by side, one core each, check more
faces a second than one batch on every core (`make bench`: `filter_faces_per_s_lanes`;
README "Lanes (CPU)").
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a container's CPU
    quota (cgroup v2 `cpu.max`, or v1's CFS quota), which affinity does not show (a pod
    limited to 4 CPUs on a 64-core node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's CPU limit in whole cores (rounded up), or None where none is set."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else math.ceil(int(quota) / int(period))
        v1_quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        v1_period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.ceil(v1_quota / v1_period) if v1_quota > 0 and v1_period > 0 else None


def batches_in_flight(setting: int, device: torch.device | str) -> int:
    """The number of filter batches to keep in flight: the setting, or for 0 the default
    of the device's kind: 2 on a GPU (stages overlap), and on the CPU 2 lanes where there
    are two cores or more."""
    if setting > 0:
        return setting
    if torch.device(device).type == "cuda":
        return 2
    return 2 if usable_cores() >= 2 else 1


def lanes_for(in_flight: int, device: torch.device | str) -> int:
    """Lanes for `in_flight` batches: one each on the CPU; one on a GPU, whose batches
    share the networks and overlap stage by stage on their own streams."""
    return in_flight if torch.device(device).type == "cpu" else 1


def share_cores(lanes: int, threads_per_lane: int | None = None) -> int:
    """Give each of `lanes` CPU lanes its share of the cores (or `threads_per_lane`, the
    operator's FACEGATE_TORCH_THREADS): torch's and OpenCV's threads per calling thread,
    both process-wide. Returns the threads per lane."""
    import cv2

    threads = threads_per_lane or max(1, usable_cores() // lanes)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def keep_thread_count() -> None:
    """Run first in each worker thread (a pool's initializer): torch computes there on the
    process's threads per lane, which `share_cores` set from another thread, not on what
    OpenMP gives a fresh thread."""
    torch.set_num_threads(torch.get_num_threads())


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
    with ThreadPoolExecutor(
        max_workers=depth, thread_name_prefix="facegate-overlap", initializer=keep_thread_count
    ) as pool:
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
