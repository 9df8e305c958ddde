"""Overlap of detection, embedding and search across batches (filter/overlap.py): batches
in flight pipeline stage by stage, every batch still checked whole, so verdicts are those
of a serial run; the dynamic batcher keeps batches in flight with the same fault
isolation and fail-closed behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from filter import overlap
from filter.decide import ImageVerdict, Reason
from filter.faces import DetectedFace, FaceAligner
from filter.identity_filter import FaceEmbeddingPipeline, StageObserver
from filter.overlap import batches_in_flight, lanes_for, overlapped, share_cores, thread_stream
from service.batcher import DynamicBatcher
from service.engine import CandidateEngine
from service.errors import FilterFailure
from service.generators import draw_rows, latents_for

WAIT = 10.0  # seconds a test waits for a concurrency it expects; a serial run never gets it


def test_in_flight_defaults_two_on_a_gpu_and_a_lane_per_core_pair_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert batches_in_flight(0, "cuda") == 2
    assert batches_in_flight(3, "cpu") == 3
    monkeypatch.setattr(overlap, "usable_cores", lambda: 2)
    assert batches_in_flight(0, torch.device("cpu")) == 2
    monkeypatch.setattr(overlap, "usable_cores", lambda: 1)
    assert batches_in_flight(0, torch.device("cpu")) == 1
    # Lanes on the CPU only: a GPU's batches share its networks and overlap by stage.
    assert lanes_for(2, "cpu") == 2
    assert lanes_for(2, "cuda") == 1
    with thread_stream("cpu"):  # nothing to enter on the CPU
        pass


def test_a_containers_cpu_quota_bounds_the_cores(tmp_path: Path) -> None:
    """A pod limited to 4 CPUs sees every core of its node in its affinity: the cgroup's
    quota (v2 `cpu.max`, v1 CFS) is what it may use, rounded up to whole cores."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("350000 100000\n")
    assert overlap._cgroup_cpu_quota(v2) == 4
    (v2 / "cpu.max").write_text("max 100000\n")
    assert overlap._cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert overlap._cgroup_cpu_quota(tmp_path / "v1") == 2
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert overlap._cgroup_cpu_quota(tmp_path / "v1") is None
    assert overlap._cgroup_cpu_quota(tmp_path / "none") is None


def test_lanes_share_the_cores_out_unless_the_operator_set_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cv2

    # (tests/conftest.py puts the session's threads back after the test.)
    monkeypatch.setattr(overlap, "usable_cores", lambda: 8)
    assert share_cores(2) == 4
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (4, 4)
    assert share_cores(16) == 1  # never none
    assert share_cores(2, threads_per_lane=3) == 3
    assert (torch.get_num_threads(), cv2.getNumThreads()) == (3, 3)


def test_overlapped_keeps_order_with_depth_calls_at_once() -> None:
    both_running = threading.Barrier(2, timeout=WAIT)

    def work(item: int) -> tuple[int, str]:
        if item < 2:
            both_running.wait()  # the first two items must be in flight together
        return item * item, threading.current_thread().name

    results = list(overlapped(work, range(6), depth=2))
    assert [value for value, _ in results] == [0, 1, 4, 9, 16, 25]
    assert all(name.startswith("facegate-overlap") for _, name in results)
    serial = list(overlapped(lambda item: threading.current_thread(), range(3), depth=1))
    assert serial == [threading.current_thread()] * 3


def test_overlapped_raises_in_order_and_abandons_no_started_call() -> None:
    started: list[int] = []
    finished: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 1:
            raise ValueError("item 1")
        time.sleep(0.05)
        finished.append(item)
        return item

    results = overlapped(work, range(6), depth=2)
    assert next(results) == 0
    with pytest.raises(ValueError, match="item 1"):
        next(results)
    # Every call that started has finished by the time the error surfaces; none after it
    # was started later.
    assert sorted(set(started) - {1}) == sorted(finished)
    assert max(started) <= 2


class _StageProbe:
    """A detector and an embedder that record which stage runs when: each stage's
    concurrency, and whether batch 1 was detected while batch 0 was being embedded."""

    crop_size = 8
    dim = 4
    name = "probe"
    model_sha256 = "0" * 64

    def __init__(self) -> None:
        self.running = {"detect": 0, "embed": 0}
        self.most = {"detect": 0, "embed": 0}
        self.lock = threading.Lock()
        self.second_batch_detecting = threading.Event()

    def _enter(self, stage: str) -> None:
        with self.lock:
            self.running[stage] += 1
            self.most[stage] = max(self.most[stage], self.running[stage])

    def _leave(self, stage: str) -> None:
        with self.lock:
            self.running[stage] -= 1

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        self._enter("detect")
        if int(images[0][0, 0, 0]) == 1:
            self.second_batch_detecting.set()
        time.sleep(0.02)
        self._leave("detect")
        landmarks = np.array([[2, 3], [6, 3], [4, 4], [2.5, 6], [5.5, 6]], np.float32)
        return [[DetectedFace((0, 0, 8, 8), 0.99, landmarks)] for _ in images]

    def searchable(self, height: int, width: int) -> bool:
        return True

    def embed(self, crops: np.ndarray) -> np.ndarray:
        self._enter("embed")
        batch = int(crops[0].max() > 0)  # batch 0 images are black
        if batch == 0:
            # Batch 0 stays in the embed stage until batch 1 is in the detect stage: a
            # serial filter would never get there.
            assert self.second_batch_detecting.wait(WAIT), "batch 1 was not detected meanwhile"
            time.sleep(0.1)  # still here when batch 1 is ready to embed
        self._leave("embed")
        out = np.zeros((len(crops), self.dim), np.float32)
        out[:, batch] = 1.0
        return out


def test_two_batches_in_flight_pipeline_stage_by_stage() -> None:
    probe = _StageProbe()
    pipeline = FaceEmbeddingPipeline(FaceAligner(probe, probe.crop_size), probe)
    batches = [[np.full((8, 8, 3), value, np.uint8)] * 3 for value in (0, 1, 2, 3)]
    results = list(overlapped(pipeline.embed_images, batches, depth=2))
    assert [len(r) for r in results] == [3, 3, 3, 3]
    assert results[0][0].embeddings[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # in input order
    assert results[1][0].embeddings[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert probe.most == {"detect": 1, "embed": 1}  # each stage serves one batch at a time


class _LaneProbe(_StageProbe):
    """One lane's detector and embedder: records the batches it detected, and holds each
    detection until `parties` detections (across lanes) are running at once."""

    def __init__(self, together: threading.Barrier) -> None:
        super().__init__()
        self.together = together
        self.detected: list[int] = []

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        self._enter("detect")
        self.detected.append(int(images[0][0, 0, 0]))
        if len(self.detected) == 1:
            self.together.wait()  # each lane's first batch: both detecting at once
        self._leave("detect")
        landmarks = np.array([[2, 3], [6, 3], [4, 4], [2.5, 6], [5.5, 6]], np.float32)
        return [[DetectedFace((0, 0, 8, 8), 0.99, landmarks)] for _ in images]

    def embed(self, crops: np.ndarray) -> np.ndarray:
        self._enter("embed")
        self._leave("embed")
        out = np.zeros((len(crops), self.dim), np.float32)
        out[:, int(crops[0].max() > 0)] = 1.0
        return out


def test_lanes_check_batches_side_by_side_each_lane_one_batch_at_a_time() -> None:
    together = threading.Barrier(2, timeout=WAIT)
    lanes = [_LaneProbe(together) for _ in range(2)]
    pipeline = FaceEmbeddingPipeline(
        FaceAligner(lanes[0], 8), lanes[0], more_lanes=[(FaceAligner(lanes[1], 8), lanes[1])]
    )
    assert pipeline.lanes == 2
    batches = [[np.full((8, 8, 3), value, np.uint8)] * 3 for value in (0, 1, 2, 3, 4, 5)]
    results = list(overlapped(pipeline.embed_images, batches, depth=2))
    assert [r[0].embeddings[0].tolist() for r in results[:2]] == [[1, 0, 0, 0], [0, 1, 0, 0]]
    # Both lanes worked (their first batches detected at once: the barrier), every batch
    # exactly once, and no lane ever held two batches.
    assert all(lane.detected for lane in lanes)
    assert sorted(lanes[0].detected + lanes[1].detected) == [0, 1, 2, 3, 4, 5]
    assert all(lane.most == {"detect": 1, "embed": 1} for lane in lanes)


def test_a_lane_must_compute_what_the_first_does() -> None:
    first, other = _StageProbe(), _StageProbe()
    other.name = "another embedder"
    with pytest.raises(ValueError, match="same detector settings and embedder"):
        FaceEmbeddingPipeline(
            FaceAligner(first, 8), first, more_lanes=[(FaceAligner(other, 8), other)]
        )


def test_a_remade_aligner_keeps_every_lane() -> None:
    """The detection scope (fast path) and the turned search rebuild the aligners: each
    lane keeps its own detector under them, and its own embedder."""
    from filter.turned import TurnedDetector, searching_turned

    probes = [_StageProbe(), _StageProbe()]
    pipeline = FaceEmbeddingPipeline(
        FaceAligner(probes[0], 8), probes[0], more_lanes=[(FaceAligner(probes[1], 8), probes[1])]
    )
    turned = searching_turned(pipeline)
    assert turned.lanes == 2
    inner = [lane.aligner.detector for lane in turned._lanes]
    assert all(isinstance(d, TurnedDetector) for d in inner)
    assert [d.inner for d in inner] == probes  # type: ignore[attr-defined]
    assert [lane.embedder for lane in turned._lanes] == probes


def test_a_derived_pipeline_takes_its_lanes_from_the_same_pool() -> None:
    """A filter swapped in by a reload (a pipeline derived with `with_aligners`) while a
    batch of the old one holds lane 0 takes lane 1, not a second hold of lane 0's
    networks and embedder."""
    together = threading.Barrier(2, timeout=WAIT)
    lanes = [_LaneProbe(together) for _ in range(2)]
    old = FaceEmbeddingPipeline(
        FaceAligner(lanes[0], 8), lanes[0], more_lanes=[(FaceAligner(lanes[1], 8), lanes[1])]
    )
    new = old.with_aligners(lambda aligner: FaceAligner(aligner.detector, aligner.crop_size))
    batch = [np.zeros((8, 8, 3), np.uint8)] * 2
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(old.embed_images, batch), pool.submit(new.embed_images, batch)]
        assert all(len(call.result(WAIT)) == 2 for call in calls)
    # Both lanes ran, each once, at the same time (the barrier), never one lane twice.
    assert [len(lane.detected) for lane in lanes] == [1, 1]
    assert all(lane.most["detect"] == 1 for lane in lanes)


# The dynamic batcher with batches in flight: small stand-ins for the generator and the
# filter (no models).


class _Generator:
    """Paints each candidate with its draw's seed: the engine turns draw rows (seed, slot,
    attempt) into latents, and this stand-in knows which latent each small seed gives."""

    name = "stand-in"
    latent_dim = 4
    model_sha256 = "0" * 64

    def __init__(self) -> None:
        self.seeds = {
            latents_for(seed, slot, 0, self.latent_dim).tobytes(): seed
            for seed in range(16)
            for slot in range(4)
        }

    def generate(self, latents: np.ndarray) -> np.ndarray:
        values = np.array([self.seeds[row.tobytes()] for row in latents], dtype=np.uint8)
        return np.repeat(values[:, None, None, None], 8 * 8 * 3, axis=1).reshape(-1, 8, 8, 3)


class _Filter:
    """Rejects images whose value is odd; fails a batch holding the poison value 13; with
    a barrier, holds each call until `parties` calls are running at once."""

    def __init__(self, parties: int = 1) -> None:
        self.barrier = threading.Barrier(parties, timeout=WAIT) if parties > 1 else None
        self.batches: list[list[int]] = []

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        values = [int(image[0, 0, 0]) for image in images]
        self.batches.append(values)
        if self.barrier is not None and len(self.batches) <= self.barrier.parties:
            self.barrier.wait()
        if 13 in values:
            raise RuntimeError("poison candidate")
        return [
            ImageVerdict(
                passed=v % 2 == 0,
                reason=None if v % 2 == 0 else Reason.IDENTITY_MATCH,
                faces=1,
                max_similarity=0.1,
                identity=None,
            )
            for v in values
        ]


def _draws(*values: int) -> np.ndarray:
    """One request's draw rows: seed = the value its candidate is painted with."""
    return draw_rows(0, [(slot, 0) for slot in range(len(values))]) + np.array(
        [[value, 0, 0, 0] for value in values], dtype=np.uint64
    )


async def _submit_all(batcher: DynamicBatcher, requests: list[np.ndarray]) -> list[object]:
    submits = [batcher.submit(draws) for draws in requests]
    return list(await asyncio.wait_for(asyncio.gather(*submits, return_exceptions=True), WAIT))


def _batched(checker: _Filter, requests: list[np.ndarray], **options: Any) -> list[object]:
    """Each request's result (outcomes, or the exception) from one batcher over `checker`,
    all submitted at once; the batcher closed after."""

    async def run() -> list[object]:
        batcher = DynamicBatcher(CandidateEngine(_Generator(), checker), **options)
        try:
            return await _submit_all(batcher, requests)
        finally:
            await batcher.close()

    return asyncio.run(run())


def test_the_batcher_keeps_two_batches_in_flight_and_answers_each_request() -> None:
    checker = _Filter(parties=2)  # both batches must be in the filter at once
    requests = [_draws(2, 3), _draws(4, 5), _draws(6)]
    results = _batched(checker, requests, max_batch=2, max_delay=0.05, in_flight=2)
    assert sorted(map(sorted, checker.batches[:2])) == [[2, 3], [4, 5]]
    for result, values in zip(results, [(2, 3), (4, 5), (6,)], strict=True):
        assert not isinstance(result, BaseException), result
        assert isinstance(result, list)
        assert [int(o.image[0, 0, 0]) for o in result] == list(values)
        assert [o.verdict.passed for o in result] == [v % 2 == 0 for v in values]


def test_lanes_share_a_gathered_batch_out_over_the_free_lanes() -> None:
    """Callers that all wait on one batch: with lanes (`spread`), its requests are shared
    out over the lanes free when it closes, whole and in order, both parts in the filter
    at once; each caller gets its own outcomes."""
    checker = _Filter(parties=2)  # both parts must be in the filter at once
    requests = [(2, 3), (4,), (6, 8, 10), (12,)]
    results = _batched(
        checker,
        [_draws(*values) for values in requests],
        max_batch=8,
        max_delay=0.05,
        in_flight=2,
        spread=True,
    )
    # Seven images in two parts of whole requests: three and four.
    assert sorted(checker.batches) == [[2, 3, 4], [6, 8, 10, 12]]
    for result, values in zip(results, requests, strict=True):
        assert isinstance(result, list), result
        assert [int(o.image[0, 0, 0]) for o in result] == list(values)


@pytest.mark.parametrize("spread", [False, True], ids=["stages", "lanes"])
def test_a_poison_batch_in_flight_fails_only_its_own_request(spread: bool) -> None:
    checker = _Filter()
    requests = [_draws(2), _draws(13), _draws(4, 6), _draws(8)]
    results = _batched(checker, requests, max_batch=4, max_delay=0.05, in_flight=2, spread=spread)
    assert isinstance(results[1], FilterFailure)
    for i in (0, 2, 3):
        result = results[i]
        assert isinstance(result, list) and all(o.verdict.passed for o in result)
    assert [13] in checker.batches  # retried alone once


def test_a_batch_that_cannot_be_shared_out_fails_its_requests_closed_and_frees_its_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug while sharing a closed batch out over the lanes kills the worker: its requests
    fail closed at once (none left waiting), no lane stays taken, and the next requests
    are served by a fresh worker."""
    from service import batcher as batcher_module

    checker = _Filter()

    def broken(live: object, parts: int) -> object:
        raise RuntimeError("a bug while sharing out")

    async def run() -> tuple[list[object], list[object]]:
        batcher = DynamicBatcher(
            CandidateEngine(_Generator(), checker),
            max_batch=8,
            max_delay=0.05,
            in_flight=2,
            spread=True,
        )
        try:
            monkeypatch.setattr(batcher_module, "_balanced", broken)
            failed = await _submit_all(batcher, [_draws(2, 3), _draws(4)])
            monkeypatch.undo()
            served = await _submit_all(batcher, [_draws(6), _draws(8)])
            return failed, served
        finally:
            await batcher.close()

    failed, served = asyncio.run(run())
    assert all(isinstance(r, FilterFailure) for r in failed), failed
    assert checker.batches[0] in ([6], [8], [6, 8])  # nothing of the failed ones was checked
    assert [[int(o.image[0, 0, 0]) for o in r] for r in served] == [[6], [8]]  # type: ignore[attr-defined]


class _HeldFilter(_Filter):
    """Holds its first call until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT)
        return super().check(images, observer)


def test_a_crashed_worker_with_a_batch_in_flight_fails_only_what_it_held() -> None:
    """While one batch is in the filter, the worker gathers the next; draw rows of another
    width cannot join it, so the worker crashes (as a bug in its own code would). What it
    held fails closed; the batch in flight is answered; a fresh worker serves the next."""
    checker = _HeldFilter()

    async def run() -> tuple[object, list[object], object]:
        batcher = DynamicBatcher(
            CandidateEngine(_Generator(), checker), max_batch=2, max_delay=0.05, in_flight=2
        )
        try:
            held = asyncio.ensure_future(batcher.submit(_draws(2)))
            assert await asyncio.to_thread(checker.entered.wait, WAIT)
            crashed = await _submit_all(batcher, [_draws(4), np.zeros((1, 6), np.uint64)])
            checker.release.set()
            first = await asyncio.wait_for(held, WAIT)
            after = await asyncio.wait_for(batcher.submit(_draws(8)), WAIT)
            return first, crashed, after
        finally:
            checker.release.set()
            await batcher.close()

    first, crashed, after = asyncio.run(run())
    assert isinstance(first, list) and first[0].verdict.passed
    assert [type(r) for r in crashed] == [FilterFailure, FilterFailure]
    assert isinstance(after, list) and after[0].verdict.passed


def test_batch_actors_check_two_blocks_at_once_only_on_a_gpu() -> None:
    from batch.engine import RayOptions, actor_calls

    assert actor_calls(RayOptions(), gpus=1.0) == 2
    assert actor_calls(RayOptions(), gpus=0.0) == 1
    assert actor_calls(RayOptions(in_flight=3), gpus=0.0) == 3
