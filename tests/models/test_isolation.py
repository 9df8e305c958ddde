"""Failure isolation (issue 9 §5): a candidate that breaks the filter fails only its own
request, never the requests batched with it, and nothing unfiltered is released."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from filter.decide import ImageVerdict
from filter.identity_filter import StageObserver
from filter.images import decode_image
from service.errors import FilterFailure
from service.generators import TorchGenerator, latents_for, load_dcgan_digiface
from service.pipeline import GenerationRequest, GenerationResult
from tests.fakes import HashListFilter, generation_pipeline

POISON_SEED = 666


class PoisonFilter(HashListFilter):
    """Raises on any batch that holds one specific image; records every call's size."""

    def __init__(self, poison: set[str]) -> None:
        super().__init__()
        self.poison = poison
        self.calls: list[int] = []
        self.checked: set[str] = set()

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        self.calls.append(len(images))
        if any(self.key(image) in self.poison for image in images):
            raise RuntimeError("embedder crashed on one input")
        verdicts = super().check(images, observer)
        self.checked |= {self.key(image) for image in images}
        return verdicts


@pytest.fixture(scope="module")
def generator(models_dir: Path) -> TorchGenerator:
    return load_dcgan_digiface(models_dir)


def test_a_poison_candidate_fails_only_its_own_request(generator: TorchGenerator) -> None:
    poison_image = generator.generate(latents_for(POISON_SEED, 0, 0, generator.latent_dim)[None])
    checker = PoisonFilter({HashListFilter.key(poison_image[0])})

    async def run() -> list[GenerationResult | BaseException]:
        pipe = generation_pipeline(generator, checker, max_delay=0.5, max_batch=64)
        try:
            return await asyncio.gather(
                pipe.generate(GenerationRequest(count=1, seed=POISON_SEED)),
                *(pipe.generate(GenerationRequest(count=3, seed=s)) for s in (10, 11, 12)),
                return_exceptions=True,
            )
        finally:
            await pipe.batcher.close()

    results = asyncio.run(run())
    assert isinstance(results[0], FilterFailure)
    # The four requests were batched together (1 + 3 * 3 candidates), that batch failed,
    # and each request was retried alone once.
    assert checker.calls[0] == 10
    assert sorted(checker.calls[1:]) == [1, 3, 3, 3]
    for result in results[1:]:
        assert isinstance(result, GenerationResult), result
        assert len(result.images) == 3
        for image in result.images:
            # Every released image went through a successful filter call.
            assert HashListFilter.key(decode_image(image.data)) in checker.checked


def test_a_lone_failing_request_is_not_retried(generator: TorchGenerator) -> None:
    poison_image = generator.generate(latents_for(POISON_SEED, 0, 0, generator.latent_dim)[None])
    checker = PoisonFilter({HashListFilter.key(poison_image[0])})

    async def run() -> None:
        pipe = generation_pipeline(generator, checker)
        with pytest.raises(FilterFailure):
            await pipe.generate(GenerationRequest(count=2, seed=POISON_SEED))
        assert checker.calls == [2]
        ok = await pipe.generate(GenerationRequest(count=2, seed=3))  # the batcher lives on
        assert len(ok.images) == 2
        await pipe.batcher.close()

    asyncio.run(run())
