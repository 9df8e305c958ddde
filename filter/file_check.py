"""One rule for `facegate check` and `facegate batch`: a file's verdict is the worst over
every image it can show (`filter.content`), and a file with bytes nobody could check is
rejected as `unchecked_content` unless one of its images already matched a training
identity (`filter.decide.SEVERITY`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

import numpy as np

from filter.content import FileContent
from filter.decide import ImageVerdict, Reason, severity, verdict_rank


class ImageChecker(Protocol):
    def check(self, images: Sequence[np.ndarray]) -> list[ImageVerdict]: ...


@dataclass(frozen=True)
class FileVerdict:
    verdict: ImageVerdict  # the file's: the worst of its images' (scores of that image)
    images: int  # how many images of the file were checked
    part: str | None  # the image that decided a rejection ("image", "frame 2", ...)
    detail: str | None  # operator-only: why it could not be checked, or was not

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def row(self) -> VerdictRow:
        """The verdict as `facegate check` prints it and `facegate batch` records it
        (operator output: the scores are the operator's, never a caller's)."""
        verdict = self.verdict
        return VerdictRow(
            verdict=verdict.verdict,
            reason=None if verdict.reason is None else str(verdict.reason),
            faces=verdict.faces,
            max_similarity=_finite(verdict.max_similarity),
            identity=verdict.identity,
            replica_similarity=_finite(verdict.replica_similarity),
            error=self.detail,
            images=self.images,
            part=self.part,
        )


class VerdictRow(TypedDict):
    verdict: str  # pass | reject
    reason: str | None
    faces: int
    max_similarity: float | None  # None: no trusted face, or no neighbour was found
    identity: str | None
    replica_similarity: float | None
    error: str | None
    images: int
    part: str | None


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def check_files(checker: ImageChecker, contents: Sequence[FileContent]) -> list[FileVerdict]:
    """Check every image of every file in one call of the filter, then decide per file."""
    flat = [view.pixels for content in contents for view in content.views]
    verdicts = checker.check(flat) if flat else []
    if len(verdicts) != len(flat):
        raise ValueError(f"the filter returned {len(verdicts)} verdicts for {len(flat)} images")
    out: list[FileVerdict] = []
    start = 0
    for content in contents:
        own = verdicts[start : start + len(content.views)]
        start += len(content.views)
        out.append(file_verdict(content, own))
    return out


def file_verdict(content: FileContent, verdicts: Sequence[ImageVerdict]) -> FileVerdict:
    """The worst verdict of the file's images (the first such image on a tie, so the file's
    own first image speaks for a pass), or `unchecked_content` when it ranks worse."""
    if not verdicts:
        raise ValueError("a file shows at least one image")
    worst = min(range(len(verdicts)), key=lambda i: verdict_rank(verdicts[i]))
    verdict, view = verdicts[worst], content.views[worst]
    if content.unaccounted and severity(Reason.UNCHECKED_CONTENT) < verdict_rank(verdict):
        unaccounted = "; ".join(content.unaccounted)
        unchecked = dataclasses.replace(
            verdict,
            passed=False,
            reason=Reason.UNCHECKED_CONTENT,
            identity=None,
            detail=unaccounted,
        )
        return FileVerdict(unchecked, len(verdicts), None, unaccounted)
    detail = verdict.detail
    if verdict.reason is Reason.UNSUPPORTED_GEOMETRY:
        height, width = view.pixels.shape[:2]
        detail = f"a {width}x{height} image is too thin to search for faces"
    if detail is not None and worst > 0:
        detail = f"{view.name}: {detail}"
    return FileVerdict(verdict, len(verdicts), None if verdict.passed else view.name, detail)
