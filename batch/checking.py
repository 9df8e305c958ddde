"""Step 2 of a batch (a model actor): the identity filter, exactly as `facegate check`
builds and runs it, with the same content rule (`filter.file_check`), on rows that
`batch.reading` read; `batch.recording` then copies what passed and writes the manifest
rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batch.errors import BatchError
from batch.manifest import COPY_PIXELS, ManifestRun
from batch.rows import CheckedRow, LoadedRow
from filter.content import FileContent, ImageView
from filter.decide import NoFacePolicy, unreadable_verdict
from filter.file_check import FileVerdict, check_files

if TYPE_CHECKING:
    from filter.assembly import EmbeddingSpec


@dataclass(frozen=True)
class FilterSpec:
    """Everything an actor needs to build the filter `facegate check` would build:
    picklable names, paths and numbers (the overrides as given; None: the index's saved
    calibration, else the defaults, resolved by `filter.thresholds.resolve_thresholds`)."""

    embedding: EmbeddingSpec
    index_path: Path
    threshold: float | None = None
    replica_threshold: float | None = None
    no_face_policy: str = NoFacePolicy.REJECT.value
    copy_mode: str = COPY_PIXELS  # batch.manifest: COPY_PIXELS or COPY_ORIGINAL

    def run(self) -> ManifestRun:
        """The index and thresholds that will judge this run (`describe()` them), from the
        index alone: the driver knows them before any model or actor starts. The actors
        open the filter (`filter.assembly.open_filter`) with the same overrides, and stop
        unless it says the same."""
        from filter.index import FaissIdentityIndex
        from filter.thresholds import in_force_for

        index = FaissIdentityIndex.load(self.index_path)
        judged_by = in_force_for(index, self.threshold, self.replica_threshold)
        return ManifestRun(judged_by, self.copy_mode, self.no_face_policy)


def row_content(row: LoadedRow) -> FileContent:
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

    def __init__(self, spec: FilterSpec, expected: ManifestRun) -> None:
        from filter.assembly import open_filter
        from filter.turned import searching_turned

        # Files are also searched turned (filter.turned), as `facegate check` searches them.
        opened = open_filter(
            searching_turned(spec.embedding.build()),
            spec.index_path,
            NoFacePolicy(spec.no_face_policy),
            threshold=spec.threshold,
            replica_threshold=spec.replica_threshold,
        )
        self.run = ManifestRun(opened.in_force, spec.copy_mode, spec.no_face_policy)
        if self.run != expected:
            # The index was replaced between the driver's look and this actor's load.
            raise BatchError(f"the index at {spec.index_path} changed during the run")
        self.filter = opened.filter

    def check(self, rows: Sequence[LoadedRow]) -> list[CheckedRow]:
        """The rule `facegate check` applies (`filter.file_check`): every image of each
        readable file, the worst verdict, `unchecked_content` for what was not read."""
        readable = [i for i, row in enumerate(rows) if row["error"] is None]
        checked = check_files(self.filter, [row_content(rows[i]) for i in readable])
        verdicts = dict(zip(readable, checked, strict=True))
        out: list[CheckedRow] = []
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
                    **result.row(),
                    **self.run.columns(),
                }
            )
        return out
