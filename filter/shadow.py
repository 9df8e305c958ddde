"""Shadow thresholds: a second set of thresholds evaluated on live traffic, never acted on.

The filter measures each image once (faces, nearest identities, nearest training image),
then decides twice: with the thresholds in force, whose verdict is the only one used,
and with the shadow thresholds, whose verdict is only compared. An operator sees what a
candidate threshold would have done to real traffic before switching to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from filter.decide import DecisionThresholds, ImageVerdict, decide, shadow_change, verdict_rank
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageObserver
from filter.index import IdentityIndex


class ShadowObserver(Protocol):
    def shadow(self, change: str) -> None:
        """One candidate compared: `change` is one of filter.decide.SHADOW_CHANGES."""
        ...


@dataclass(frozen=True)
class ShadowThresholds:
    """Shadow overrides; a None keeps the threshold in force for that signal."""

    identity: float | None = None
    replica: float | None = None

    @property
    def enabled(self) -> bool:
        return self.identity is not None or self.replica is not None

    def applied_to(self, in_force: DecisionThresholds) -> DecisionThresholds:
        replica = in_force.replica
        if replica is not None and self.replica is not None:
            replica = self.replica  # an index without replica features has no replica signal
        return DecisionThresholds(
            identity=in_force.identity if self.identity is None else self.identity,
            replica=replica,
        )


class ShadowedFilter:
    """An identity filter that also decides with shadow thresholds and reports the
    difference. Its verdicts are exactly the wrapped filter's."""

    def __init__(
        self, inner: IdentityFilter, shadow: DecisionThresholds, observer: ShadowObserver
    ) -> None:
        self.inner = inner
        self.shadow_thresholds = shadow
        self.observer = observer

    @property
    def thresholds(self) -> DecisionThresholds:
        return self.inner.thresholds

    @property
    def embedding(self) -> FaceEmbeddingPipeline:
        return self.inner.embedding

    @property
    def index(self) -> IdentityIndex:
        return self.inner.index

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        """The in-force verdict of each image. One comparison is reported per candidate:
        images that show one candidate (`candidates`, e.g. a JPEG as generated and as
        decoded) are judged by their worst view under each set of thresholds, as the
        engine judges the candidate."""
        in_force: list[ImageVerdict] = []
        shadow: list[ImageVerdict] = []
        for evidence in self.inner.evidence(images, observer):
            in_force.append(decide(evidence, self.inner.thresholds, self.inner.no_face_policy))
            shadow.append(decide(evidence, self.shadow_thresholds, self.inner.no_face_policy))
        groups: dict[int, list[int]] = {}
        owners = range(len(images)) if candidates is None else candidates
        for image, candidate in zip(range(len(images)), owners, strict=True):
            groups.setdefault(candidate, []).append(image)
        for views in groups.values():
            worst_in_force = min((in_force[i] for i in views), key=verdict_rank)
            worst_shadow = min((shadow[i] for i in views), key=verdict_rank)
            self.observer.shadow(shadow_change(worst_in_force, worst_shadow))
        return in_force
