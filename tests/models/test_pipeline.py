"""The gRPC-free core: slots, resampling, seeds, batching and cancellation.

The filter here is a small stand-in that rejects images by content hash, so each test
decides exactly which candidates are 'training identities'. The generator is real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from filter.images import decode_image
from service.encoding import ImageFormat
from service.errors import FilterFailure, InvalidRequest, NothingPassed
from service.generators import TorchGenerator, draw_rows, latents_for, load_dcgan_digiface
from service.pipeline import GenerationRequest
from tests.fakes import HashListFilter, generation_pipeline


@pytest.fixture(scope="module")
def generator(models_dir: Path) -> TorchGenerator:
    return load_dcgan_digiface(models_dir)


def _enrol(
    checker: HashListFilter, generator: TorchGenerator, seed: int, slot: int, attempts: range
) -> None:
    latents = np.stack([latents_for(seed, slot, a, generator.latent_dim) for a in attempts])
    for image in generator.generate(latents):
        checker.enrolled.add(checker.key(image))


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(generator: TorchGenerator) -> None:
    async def run() -> None:
        pipe = generation_pipeline(generator, HashListFilter())
        a = await pipe.generate(GenerationRequest(count=3, seed=42))
        b = await pipe.generate(GenerationRequest(count=3, seed=42))
        c = await pipe.generate(GenerationRequest(count=3, seed=43))
        assert [i.data for i in a.images] == [i.data for i in b.images]
        assert not {i.data for i in a.images} & {i.data for i in c.images}
        assert a.summary.seed == 42 and all(i.media_type == "image/png" for i in a.images)
        await pipe.batcher.close()

    asyncio.run(run())


def test_a_slot_is_independent_of_the_request_size(generator: TorchGenerator) -> None:
    async def run() -> None:
        pipe = generation_pipeline(generator, HashListFilter())
        small = await pipe.generate(GenerationRequest(count=2, seed=5))
        large = await pipe.generate(GenerationRequest(count=7, seed=5))
        assert [i.data for i in small.images] == [i.data for i in large.images[:2]]
        await pipe.batcher.close()

    asyncio.run(run())


def test_rejected_candidates_are_resampled_and_counted(generator: TorchGenerator) -> None:
    checker = HashListFilter()
    _enrol(checker, generator, seed=9, slot=1, attempts=range(2))  # slot 1: first two rejected

    async def run() -> None:
        pipe = generation_pipeline(generator, checker)
        result = await pipe.generate(GenerationRequest(count=3, seed=9))
        assert [(i.slot, i.attempts) for i in result.images] == [(0, 1), (1, 3), (2, 1)]
        s = result.summary
        assert (s.candidates_drawn, s.candidates_rejected, s.slots_unfilled) == (5, 2, 0)
        released = {checker.key(decode_image(i.data)) for i in result.images}
        assert not released & checker.enrolled  # nothing enrolled ever leaves
        await pipe.batcher.close()

    asyncio.run(run())


def test_exhausted_slots_are_unfilled_never_padded(generator: TorchGenerator) -> None:
    checker = HashListFilter()
    _enrol(checker, generator, seed=3, slot=0, attempts=range(4))

    async def run() -> None:
        pipe = generation_pipeline(generator, checker, max_attempts=4)
        result = await pipe.generate(GenerationRequest(count=2, seed=3))
        assert [i.slot for i in result.images] == [1]
        assert result.summary.slots_unfilled == 1 and result.summary.candidates_rejected == 4
        with pytest.raises(NothingPassed) as info:
            await pipe.generate(GenerationRequest(count=1, seed=3))
        assert info.value.summary.candidates_drawn == 4  # type: ignore[attr-defined]
        await pipe.batcher.close()

    asyncio.run(run())


def test_filter_failure_fails_the_request_closed(generator: TorchGenerator) -> None:
    checker = HashListFilter()
    checker.fail = True

    async def run() -> None:
        pipe = generation_pipeline(generator, checker)
        with pytest.raises(FilterFailure):
            await pipe.generate(GenerationRequest(count=2, seed=1))
        await pipe.batcher.close()

    asyncio.run(run())


def test_concurrent_requests_share_batches(generator: TorchGenerator) -> None:
    checker = HashListFilter()

    async def run() -> None:
        pipe = generation_pipeline(generator, checker, max_delay=0.2)
        # Not a timing window: gather starts the four requests before the batcher's worker
        # takes its first step, so all four are queued when it gathers its first batch.
        results = await asyncio.gather(
            *[pipe.generate(GenerationRequest(count=4, seed=s)) for s in range(4)]
        )
        assert all(len(r.images) == 4 for r in results)
        assert checker.batches == [16]  # four requests, one filter batch
        await pipe.batcher.close()

    asyncio.run(run())


def test_batches_respect_max_batch(generator: TorchGenerator) -> None:
    checker = HashListFilter()

    async def run() -> None:
        pipe = generation_pipeline(generator, checker, max_batch=6, max_delay=0.2)
        await asyncio.gather(*[pipe.generate(GenerationRequest(count=4, seed=s)) for s in range(3)])
        assert max(checker.batches) <= 6 and sum(checker.batches) == 12
        await pipe.batcher.close()

    asyncio.run(run())


def test_cancelled_request_stops_drawing(generator: TorchGenerator) -> None:
    checker = HashListFilter()
    for slot in range(8):
        _enrol(checker, generator, seed=11, slot=slot, attempts=range(50))

    async def run() -> None:
        pipe = generation_pipeline(generator, checker, max_attempts=50)
        task = asyncio.create_task(pipe.generate(GenerationRequest(count=8, seed=11)))
        for _ in range(3000):  # until the request has drawn two rounds (30 s at most)
            if sum(checker.batches) >= 16:
                break
            await asyncio.sleep(0.01)
        assert sum(checker.batches) >= 16, "the request never got going"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        drawn = sum(checker.batches)
        # Two more rounds through the batcher: a request still drawing would have queued
        # its next round in between.
        for _ in range(2):
            await pipe.batcher.submit(draw_rows(99, [(0, 0)]))
        assert sum(checker.batches) <= drawn + 8 + 2  # the round already running, the two
        assert sum(checker.batches) < 8 * 50
        await pipe.batcher.close()

    asyncio.run(run())


@pytest.mark.parametrize("count", [0, 17])
def test_count_out_of_range_is_invalid(generator: TorchGenerator, count: int) -> None:
    async def run() -> None:
        pipe = generation_pipeline(generator, HashListFilter())
        with pytest.raises(InvalidRequest, match="count must be between 1 and 16"):
            await pipe.generate(GenerationRequest(count=count))
        await pipe.batcher.close()

    asyncio.run(run())


def test_jpeg_output(generator: TorchGenerator) -> None:
    async def run() -> None:
        pipe = generation_pipeline(generator, HashListFilter())
        result = await pipe.generate(
            GenerationRequest(count=1, seed=1, image_format=ImageFormat.JPEG)
        )
        assert result.images[0].data[:3] == b"\xff\xd8\xff"
        assert result.images[0].media_type == "image/jpeg"
        await pipe.batcher.close()

    asyncio.run(run())
