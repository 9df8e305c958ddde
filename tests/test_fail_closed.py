"""Fail closed below gRPC: a generator that raises or miscounts, a failure after some slots
already passed, and a batcher worker that crashes with requests gathered and carried.

Small doubles stand in for the generator and the filter (no models): each test scripts
exactly which call fails and which candidate passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from filter.decide import ImageVerdict, Reason
from filter.identity_filter import StageObserver
from service.batcher import CandidateEngine, DynamicBatcher
from service.errors import FilterFailure
from service.pipeline import GenerationPipeline, GenerationRequest, ReleasedImage

LATENT_DIM = 8


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


class ScriptedFilter:
    """Passes a candidate when `passes(call, position)` says so; remembers what passed."""

    def __init__(self, passes: Callable[[int, int], bool]) -> None:
        self.passes = passes
        self.calls = 0
        self.passed: list[np.ndarray] = []
        self.rejected: list[np.ndarray] = []

    def check(
        self, images: Sequence[np.ndarray], observer: StageObserver | None = None
    ) -> list[ImageVerdict]:
        call = self.calls
        self.calls += 1
        verdicts = []
        for position, image in enumerate(images):
            ok = self.passes(call, position)
            (self.passed if ok else self.rejected).append(image)
            verdicts.append(
                ImageVerdict(
                    passed=ok,
                    reason=None if ok else Reason.IDENTITY_MATCH,
                    faces=1,
                    max_similarity=0.1 if ok else 0.9,
                    identity=None if ok else "enrolled-person",
                )
            )
        return verdicts


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
    """Submit one request per latent shape, all queued before the worker runs. Latents of
    different widths cannot be concatenated: the worker raises outside its per-batch try,
    as any bug in its own code would. Returns each request's result or exception."""
    generator = ScriptedGenerator()
    checker = ScriptedFilter(lambda call, position: True)

    async def run() -> list[object]:
        batcher = DynamicBatcher(
            CandidateEngine(generator, checker), max_batch=max_batch, max_delay=0.05
        )
        # Everything is queued before the worker's first step, so what is gathered, carried
        # and left queued does not depend on the delay.
        submits = [batcher.submit(np.zeros(shape, dtype=np.float32)) for shape in shapes]
        # A request the crash forgot would wait forever: the timeout turns that into a failure.
        results = await asyncio.wait_for(asyncio.gather(*submits, return_exceptions=True), 10)
        assert generator.calls == 0  # the crash came before anything was generated
        # A fresh worker serves the next request: the crash did not take the batcher down.
        after = await asyncio.wait_for(batcher.submit(np.zeros((2, 4), dtype=np.float32)), 10)
        assert len(after) == 2 and all(o.verdict.passed for o in after)
        await batcher.close()
        return list(results)

    return asyncio.run(run())


def test_a_crashed_worker_fails_its_gathered_requests_closed() -> None:
    results = _crash_batch([(1, 4), (1, 6)], max_batch=64)
    assert [type(r) for r in results] == [FilterFailure, FilterFailure]


def test_a_crashed_worker_fails_carried_and_queued_requests_closed() -> None:
    """max_batch 3: the first two requests (1 + 1 latents) are gathered, the third (2 more)
    does not fit and is carried to open the next batch, the fourth is still queued."""
    results = _crash_batch([(1, 4), (1, 6), (2, 4), (1, 4)], max_batch=3)
    assert [type(r) for r in results] == [FilterFailure] * 4
