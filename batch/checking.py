"""Step 2 of a batch (a model actor): the identity filter, exactly as `facegate check`
builds and runs it, on rows that `batch.reading` decoded; `batch.recording` then copies
what passed and writes the manifest rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batch.manifest import RunIdentity
from filter.decide import ImageVerdict, NoFacePolicy, Reason, unreadable_verdict
from filter.errors import FilterError

if TYPE_CHECKING:
    from filter.runtime import EmbeddingSpec

Row = dict[str, Any]


@dataclass(frozen=True)
class FilterSpec:
    """Everything an actor needs to build the filter `facegate check` would build:
    picklable names, paths and numbers (the overrides as given; None: the index's saved
    calibration, else the defaults, resolved by `filter.runtime.resolve_thresholds`)."""

    embedding: EmbeddingSpec
    index_path: Path
    threshold: float | None = None
    replica_threshold: float | None = None
    no_face_policy: str = NoFacePolicy.REJECT.value

    def run_identity(self) -> tuple[RunIdentity, str]:
        """The index fingerprint and thresholds in force (and their description), from the
        index alone: the driver knows them before any model or actor starts."""
        from filter.index import FaissIdentityIndex
        from filter.runtime import resolve_thresholds

        index = FaissIdentityIndex.load(self.index_path)
        thresholds = resolve_thresholds(index, self.threshold, self.replica_threshold)
        run = RunIdentity(index.fingerprint, thresholds.identity, thresholds.replica)
        return run, thresholds.describe()


def verdict_columns(verdict: ImageVerdict, error: str | None, shape: tuple[int, int] | None) -> Row:
    """The manifest's verdict columns, as `facegate check` reports them (unrounded)."""
    if error is None and verdict.detail is not None:
        error = verdict.detail
    if verdict.reason is Reason.UNSUPPORTED_GEOMETRY and shape is not None:
        error = f"a {shape[1]}x{shape[0]} image is too thin to search for faces"
    return {
        "verdict": verdict.verdict,
        "reason": None if verdict.reason is None else str(verdict.reason),
        "faces": verdict.faces,
        "max_similarity": _finite(verdict.max_similarity),
        "identity": verdict.identity,
        "replica_similarity": _finite(verdict.replica_similarity),
        "error": error,
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)


class BatchChecker:
    """The model side of a batch: the embedding pipeline, the index and the thresholds
    that `facegate check` would use for the same options (one per actor)."""

    def __init__(self, spec: FilterSpec, expected: RunIdentity) -> None:
        from filter.identity_filter import IdentityFilter
        from filter.runtime import load_index_for, resolve_thresholds

        pipeline = spec.embedding.build()
        index = load_index_for(pipeline, spec.index_path)
        thresholds = resolve_thresholds(index, spec.threshold, spec.replica_threshold)
        self.run = RunIdentity(index.fingerprint, thresholds.identity, thresholds.replica)
        if self.run != expected:
            # The index was replaced between the driver's look and this actor's load.
            raise FilterError(f"the index at {spec.index_path} changed during the run")
        self.filter = IdentityFilter(
            pipeline, index, thresholds.decision, NoFacePolicy(spec.no_face_policy)
        )

    def check(self, rows: Sequence[Row]) -> list[Row]:
        readable = [i for i, row in enumerate(rows) if row["error"] is None]
        images = [
            np.frombuffer(rows[i]["pixels"], np.uint8).reshape(
                rows[i]["height"], rows[i]["width"], 3
            )
            for i in readable
        ]
        verdicts = dict(zip(readable, self.filter.check(images), strict=True))
        out: list[Row] = []
        for i, row in enumerate(rows):
            verdict = verdicts.get(i) or unreadable_verdict()
            shape = (row["height"], row["width"]) if i in verdicts else None
            out.append(
                {
                    "path": row["key"],
                    "sha256": row["sha256"],
                    "copy_to": row["copy_to"],
                    "data": row["data"] if verdict.passed else None,
                    **verdict_columns(verdict, row["error"], shape),
                    **self.run.columns(),
                }
            )
        return out
