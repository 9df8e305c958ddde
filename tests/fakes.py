"""Stand-ins shared by the tests: filters whose verdicts a test scripts, generators that
count or repeat what they draw, and the generation pipeline over them."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from filter.decide import ImageVerdict, Reason
from filter.identity_filter import StageObserver
from service.batcher import DynamicBatcher
from service.engine import CandidateEngine
from service.generators import TorchGenerator
from service.pipeline import GenerationPipeline


class ScriptedFilter:
    """`passes(call, position)`: True passes, False rejects (naming `label`, an enrolled
    identity), an exception fails the call. Remembers what passed and what was rejected;
    `entered` is set on the first call. A verdict reports `similarity[0]` when it passes and
    `similarity[1]` when it rejects."""

    def __init__(
        self,
        passes: Callable[[int, int], bool],
        label: str = "enrolled-person",
        similarity: tuple[float, float] = (0.1, 0.9),
    ) -> None:
        self.passes = passes
        self.label = label
        self.similarity = similarity
        self.calls = 0
        self.passed: list[np.ndarray] = []
        self.rejected: list[np.ndarray] = []
        self.entered = threading.Event()

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        call = self.calls
        self.calls += 1
        self.entered.set()
        verdicts = [self._verdict(self.passes(call, i)) for i in range(len(images))]
        for image, verdict in zip(images, verdicts, strict=True):
            (self.passed if verdict.passed else self.rejected).append(image)
        return verdicts

    def _verdict(self, passed: bool) -> ImageVerdict:
        return ImageVerdict(
            passed=passed,
            reason=None if passed else Reason.IDENTITY_MATCH,
            faces=1,
            max_similarity=self.similarity[0] if passed else self.similarity[1],
            identity=None if passed else self.label,
        )


class HashListFilter:
    """Rejects images whose pixel hash is enrolled; records batch sizes and which candidate
    each image was said to show."""

    def __init__(self) -> None:
        self.enrolled: set[str] = set()
        self.batches: list[int] = []
        self.candidates: list[list[int] | None] = []
        self.fail = False

    @staticmethod
    def key(image: np.ndarray) -> str:
        return hashlib.sha256(image.tobytes()).hexdigest()

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        if self.fail:
            raise RuntimeError("embedder exploded")
        self.batches.append(len(images))
        self.candidates.append(None if candidates is None else list(candidates))
        out = []
        for image in images:
            hit = self.key(image) in self.enrolled
            out.append(
                ImageVerdict(
                    passed=not hit,
                    reason=Reason.IDENTITY_MATCH if hit else None,
                    faces=1,
                    max_similarity=1.0 if hit else 0.1,
                    identity="enrolled" if hit else None,
                )
            )
        return out


def generation_pipeline(
    generator: TorchGenerator, checker: HashListFilter, **kw: float
) -> GenerationPipeline:
    """The pipeline over a real generator and `checker`, with the service's batching."""
    batcher = DynamicBatcher(
        CandidateEngine(generator, checker),
        max_batch=int(kw.get("max_batch", 64)),
        max_delay=kw.get("max_delay", 0.005),
    )
    return GenerationPipeline(
        batcher, generator.latent_dim, max_attempts=int(kw.get("max_attempts", 4)), max_count=16
    )


class CountingGenerator:
    """The real generator, counting every latent the engine draws (whoever asked for it)."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.drawn = 0
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def generate(self, latents: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(60)
        self.drawn += len(latents)
        self.batches.append(len(latents))
        return self.real.generate(latents)  # type: ignore[attr-defined, no-any-return]


class FixedFrame(torch.nn.Module):
    """A TorchScript 'generator' that always emits one frame (the generator contract:
    (N, latent) in, (N, 3, H, W) in [-1, 1] out)."""

    def __init__(self, frame: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frame", frame)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.frame.unsqueeze(0).expand(z.shape[0], -1, -1, -1) + 0.0 * z[:, :1, None, None]
