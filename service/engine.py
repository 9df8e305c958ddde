"""The engine that generates and filters one batch of candidates (the dynamic batcher in
`service.batcher` feeds it from the event loop).

What travels to it are draws, rows of (seed, slot, attempt, delivery), not latents: the
engine reads the filter in force once per batch and derives each latent under that
filter's index salt (service.generators.latents_for), so the candidate drawn and the
filter that checks it always belong to the same index, also across a hot reload. A JPEG
delivery is encoded before the check, and both the generated and the decoded pixels are
checked (service.encoding.deliver).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
