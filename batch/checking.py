"""Step 2 of a batch (a model actor): the identity filter, exactly as `facegate check`
builds and runs it, with the same content rule (`filter.file_check`), on rows that
`batch.reading` read; `batch.recording` then copies what passed and writes the manifest
rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batch.manifest import COPY_PIXELS, RunIdentity
from filter.content import FileContent, ImageView
from filter.decide import NoFacePolicy, unreadable_verdict
from filter.errors import FilterError
from filter.file_check import FileVerdict, check_files

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
    copy_mode: str = COPY_PIXELS  # batch.manifest: COPY_PIXELS or COPY_ORIGINAL

    def run_identity(self) -> tuple[RunIdentity, str]:
        """The index fingerprint and thresholds in force (and their description), from the
        index alone: the driver knows them before any model or actor starts."""
        from filter.index import FaissIdentityIndex
        from filter.runtime import resolve_thresholds

        index = FaissIdentityIndex.load(self.index_path)
        thresholds = resolve_thresholds(index, self.threshold, self.replica_threshold)
        run = RunIdentity(
            index.fingerprint, thresholds.identity, thresholds.replica, self.copy_mode
        )
        return run, thresholds.describe()


def verdict_columns(result: FileVerdict) -> Row:
    """The manifest's verdict columns, as `facegate check` reports them (unrounded)."""
    verdict = result.verdict
    return {
        "verdict": verdict.verdict,
        "reason": None if verdict.reason is None else str(verdict.reason),
        "faces": verdict.faces,
        "max_similarity": _finite(verdict.max_similarity),
        "identity": verdict.identity,
        "replica_similarity": _finite(verdict.replica_similarity),
        "error": result.detail,
        "images": result.images,
        "part": result.part,
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)


def row_content(row: Row) -> FileContent:
    """The images a read row carries, as `filter.content` read them."""
    views = tuple(
        ImageView(name, np.frombuffer(pixels, np.uint8).reshape(height, width, 3))
        for name, pixels, height, width in zip(
            row["view_names"],
            row["view_pixels"],
            row["view_heights"],
            row["view_widths"],
            strict=True,
        )
    )
    return FileContent("", views, int(row["frames"]), tuple(row["unaccounted"]))


class BatchChecker:
    """The model side of a batch: the embedding pipeline, the index and the thresholds
    that `facegate check` would use for the same options (one per actor)."""

    def __init__(self, spec: FilterSpec, expected: RunIdentity) -> None:
        from filter.identity_filter import IdentityFilter
        from filter.runtime import load_index_for, resolve_thresholds

        pipeline = spec.embedding.build()
        index = load_index_for(pipeline, spec.index_path)
        thresholds = resolve_thresholds(index, spec.threshold, spec.replica_threshold)
        self.run = RunIdentity(
            index.fingerprint, thresholds.identity, thresholds.replica, spec.copy_mode
        )
        if self.run != expected:
            # The index was replaced between the driver's look and this actor's load.
            raise FilterError(f"the index at {spec.index_path} changed during the run")
        self.filter = IdentityFilter(
            pipeline, index, thresholds.decision, NoFacePolicy(spec.no_face_policy)
        )

    def check(self, rows: Sequence[Row]) -> list[Row]:
        """The rule `facegate check` applies (`filter.file_check`): every image of each
        readable file, the worst verdict, `unchecked_content` for what was not read."""
        readable = [i for i, row in enumerate(rows) if row["error"] is None]
        checked = check_files(self.filter, [row_content(rows[i]) for i in readable])
        verdicts = dict(zip(readable, checked, strict=True))
        out: list[Row] = []
        for i, row in enumerate(rows):
            result = verdicts.get(i) or FileVerdict(unreadable_verdict(), 0, None, row["error"])
            out.append(
                {
                    "path": row["key"],
                    "sha256": row["sha256"],
                    "copy_to": row["copy_to"],
                    "copy": row["copy"] if result.passed else None,
                    "source_size": row["source_size"],
                    "source_mtime_ns": row["source_mtime_ns"],
                    "supersedes": row["supersedes"] or None,
                    **verdict_columns(result),
                    **self.run.columns(),
                }
            )
        return out
