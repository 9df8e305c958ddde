"""Fail closed below gRPC: a generator that raises or miscounts, a failure after some slots
already passed, and a batcher worker that crashes with requests gathered and carried.

Small doubles stand in for the generator and the filter (no models): each test scripts
exactly which call fails and which candidate passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np
import pytest

from filter.decide import ImageVerdict
from filter.images import decode_image
from service.audit import Rejection
from service.batcher import DynamicBatcher
from service.engine import CandidateEngine
from service.errors import FilterFailure, NothingPassed
from service.generators import DRAW_COLUMNS, latents_for
from service.pipeline import (
    GenerationPipeline,
    GenerationRequest,
    GenerationResult,
    GenerationSummary,
    ReleasedImage,
)
from tests.fakes import ScriptedFilter

LATENT_DIM = 8
WIDER = DRAW_COLUMNS + 3  # draw rows of another width: they cannot be concatenated


class ScriptedGenerator:
    """8x8 images that are a pure function of the latent; `script(call)` may raise or
    change how many images a call returns (a count delta)."""

    name = "scripted"
    latent_dim = LATENT_DIM
    model_sha256 = "0" * 64

    def __init__(self, script: Callable[[int], int] | None = None) -> None:
        self.script = script or (lambda call: 0)
        self.calls = 0
        self.drawn = 0  # latents received: keeps counting whatever the requests do

    def generate(self, latents: np.ndarray) -> np.ndarray:
        call = self.calls
        self.calls += 1
        self.drawn += len(latents)
        delta = self.script(call)
        pixels = (np.abs(latents[:, :1, None, None]) * 97 + np.arange(64).reshape(1, 8, 8, 1)) % 256
        images = np.repeat(pixels, 3, axis=3).astype(np.uint8)
        if delta > 0:
            return np.concatenate([images, images[:delta]])
        return images[: len(latents) + delta]


def _pipeline(
    generator: ScriptedGenerator, checker: ScriptedFilter, max_attempts: int = 4
) -> GenerationPipeline:
    batcher = DynamicBatcher(CandidateEngine(generator, checker), max_batch=64, max_delay=0.001)
    return GenerationPipeline(batcher, LATENT_DIM, max_attempts=max_attempts, max_count=16)


def _raise_on(failing_call: int) -> Callable[[int], int]:
    def script(call: int) -> int:
        if call == failing_call:
            raise RuntimeError("generator blew up")
        return 0

    return script


def test_a_generator_that_raises_fails_the_request_closed() -> None:
    checker = ScriptedFilter(lambda call, position: True)

    async def run() -> None:
        pipe = _pipeline(ScriptedGenerator(_raise_on(0)), checker)
        with pytest.raises(FilterFailure, match="RuntimeError"):
            await pipe.generate(GenerationRequest(count=3, seed=1))
        assert checker.calls == 0  # nothing reached the filter, nothing was released
        await pipe.batcher.close()

    asyncio.run(run())


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_generator_returning_the_wrong_number_of_images_fails_closed(delta: int) -> None:
    checker = ScriptedFilter(lambda call, position: True)

    async def run() -> None:
        pipe = _pipeline(ScriptedGenerator(lambda call: delta), checker)
        with pytest.raises(FilterFailure):
            await pipe.generate(GenerationRequest(count=3, seed=1))
        assert checker.calls == 0  # the count is checked before anything is filtered
        await pipe.batcher.close()

    asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_after_some_slots_passed_releases_only_those(stream: bool) -> None:
    """Round 1: slot 0 passes, slots 1 and 2 are rejected. Round 2: the generator raises.
    The request fails; in stream mode only slot 0 went out, and nothing rejected ever did."""
    checker = ScriptedFilter(lambda call, position: call == 0 and position == 0)
    sent: list[ReleasedImage] = []

    async def on_image(image: ReleasedImage) -> None:
        sent.append(image)

    async def run() -> None:
        pipe = _pipeline(ScriptedGenerator(_raise_on(1)), checker)
        with pytest.raises(FilterFailure):
            await pipe.generate(
                GenerationRequest(count=3, seed=5), on_image=on_image if stream else None
            )
        await pipe.batcher.close()

    asyncio.run(run())
    assert len(checker.passed) == 1 and len(checker.rejected) == 2
    if stream:
        assert [(image.slot, image.attempts) for image in sent] == [(0, 1)]
    else:
        assert sent == []


def _crash_batch(shapes: Sequence[tuple[int, int]], max_batch: int) -> list[object]:
    """Submit one request per draw-array shape, all queued before the worker runs. Arrays
    of different widths cannot be concatenated: the worker raises outside its per-batch
    try, as any bug in its own code would. Returns each request's result or exception."""
    generator = ScriptedGenerator()
    checker = ScriptedFilter(lambda call, position: True)

    async def run() -> list[object]:
        batcher = DynamicBatcher(
            CandidateEngine(generator, checker), max_batch=max_batch, max_delay=0.05
        )
        # Everything is queued before the worker's first step, so what is gathered, carried
        # and left queued does not depend on the delay.
        submits = [batcher.submit(np.zeros(shape, dtype=np.uint64)) for shape in shapes]
        # A request the crash forgot would wait forever: the timeout turns that into a failure.
        results = await asyncio.wait_for(asyncio.gather(*submits, return_exceptions=True), 10)
        assert generator.calls == 0  # the crash came before anything was generated
        # A fresh worker serves the next request: the crash did not take the batcher down.
        after = await asyncio.wait_for(
            batcher.submit(np.zeros((2, DRAW_COLUMNS), dtype=np.uint64)), 10
        )
        assert len(after) == 2 and all(o.verdict.passed for o in after)
        await batcher.close()
        return list(results)

    return asyncio.run(run())


def test_a_crashed_worker_fails_its_gathered_requests_closed() -> None:
    results = _crash_batch([(1, DRAW_COLUMNS), (1, WIDER)], max_batch=64)
    assert [type(r) for r in results] == [FilterFailure, FilterFailure]


def test_a_crashed_worker_fails_carried_and_queued_requests_closed() -> None:
    """max_batch 3: the first two requests (1 + 1 latents) are gathered, the third (2 more)
    does not fit and is carried to open the next batch, the fourth is still queued."""
    results = _crash_batch(
        [(1, DRAW_COLUMNS), (1, WIDER), (2, DRAW_COLUMNS), (1, DRAW_COLUMNS)], max_batch=3
    )
    assert [type(r) for r in results] == [FilterFailure] * 4


class Recorder:
    """Audit sink and pipeline observer in one: what the operator would be told."""

    def __init__(self) -> None:
        self.rejections: list[Rejection] = []
        self.released: list[int] = []
        self.unfilled: list[int] = []

    def rejection(self, record: Rejection) -> None:
        self.rejections.append(record)

    def close(self) -> None:
        return None

    def observe_stage(self, stage: str, seconds: float) -> None:
        return None

    def candidate(self, verdict: ImageVerdict) -> None:
        return None

    def batch(self, size: int) -> None:
        return None

    def released_(self, attempts: int) -> None:
        self.released.append(attempts)


def _recorded_pipeline(
    generator: ScriptedGenerator, checker: ScriptedFilter, recorder: Recorder, max_attempts: int
) -> GenerationPipeline:
    batcher = DynamicBatcher(CandidateEngine(generator, checker), max_batch=64, max_delay=0.001)
    observer = SimpleNamespace(
        observe_stage=recorder.observe_stage,
        candidate=recorder.candidate,
        batch=recorder.batch,
        released=recorder.released_,
        unfilled=recorder.unfilled.append,
    )
    return GenerationPipeline(
        batcher,
        LATENT_DIM,
        max_attempts=max_attempts,
        max_count=16,
        observer=observer,  # type: ignore[arg-type]
        audit=recorder,
    )


def test_what_is_released_and_counted_follows_the_verdicts_exactly() -> None:
    """Round 0: slots 0 and 2 pass, slot 1 is rejected; round 1 (slot 1 alone): rejected;
    round 2: passes. Every field of what leaves, and of what the operator is told."""
    script = {0: [True, False, True], 1: [False], 2: [True]}
    checker = ScriptedFilter(lambda call, position: script[call][position])
    generator = ScriptedGenerator()
    recorder = Recorder()
    seen: list[np.ndarray] = []
    original = generator.generate

    def recording(latents: np.ndarray) -> np.ndarray:
        seen.extend(latents)
        return original(latents)

    generator.generate = recording  # type: ignore[method-assign]

    async def run() -> GenerationResult:
        pipe = _recorded_pipeline(generator, checker, recorder, max_attempts=4)
        try:
            return await pipe.generate(GenerationRequest(count=3, seed=5, request_id="r-1"))
        finally:
            await pipe.batcher.close()

    result = asyncio.run(run())
    # The latents are the seed's: slot/attempt streams in the order they were drawn.
    expected = [(0, 0), (1, 0), (2, 0), (1, 1), (1, 2)]
    for latent, (slot, attempt) in zip(seen, expected, strict=True):
        assert np.array_equal(latent, latents_for(5, slot, attempt, LATENT_DIM))
    assert [(i.slot, i.attempts) for i in result.images] == [(0, 1), (1, 3), (2, 1)]
    passed = [checker.passed[0], checker.passed[2], checker.passed[1]]  # slot order
    for image, pixels in zip(result.images, passed, strict=True):
        assert np.array_equal(decode_image(image.data), pixels)
        assert (image.media_type, image.width, image.height) == ("image/png", 8, 8)
    s = result.summary
    assert (s.requested, s.seed, s.request_id) == (3, 5, "r-1")
    assert (s.released, s.candidates_drawn, s.candidates_rejected, s.slots_unfilled) == (3, 5, 2, 0)
    assert recorder.released == [1, 1, 3] and recorder.unfilled == []
    assert [(r.slot, r.attempt) for r in recorder.rejections] == [(1, 0), (1, 1)]
    for record in recorder.rejections:
        assert (record.request_id, record.reason, record.faces) == ("r-1", "identity_match", 1)
        assert (record.similarity, record.identity) == (0.9, "enrolled-person")


def test_the_attempt_budget_is_exact_and_unfilled_slots_are_reported() -> None:
    """Slot 0 passes at once; slot 1 is rejected every time: three attempts, not four."""
    checker = ScriptedFilter(lambda call, position: call == 0 and position == 0)
    recorder = Recorder()

    async def run() -> tuple[GenerationResult, NothingPassed]:
        pipe = _recorded_pipeline(ScriptedGenerator(), checker, recorder, max_attempts=3)
        try:
            partial = await pipe.generate(GenerationRequest(count=2, seed=9))
            with pytest.raises(NothingPassed) as info:
                await pipe.generate(GenerationRequest(count=2, seed=9))  # call 0 is gone now
            return partial, info.value
        finally:
            await pipe.batcher.close()

    partial, nothing = asyncio.run(run())
    assert [i.slot for i in partial.images] == [0]
    assert (partial.summary.candidates_drawn, partial.summary.slots_unfilled) == (4, 1)
    assert recorder.unfilled == [1, 2]
    summary = nothing.summary
    assert isinstance(summary, GenerationSummary)
    assert (summary.candidates_drawn, summary.candidates_rejected) == (6, 6)
    assert (summary.released, summary.slots_unfilled) == (0, 2)
