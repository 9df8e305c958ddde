"""`facegate check`: verdicts for image files, one JSON line each, in input order."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.common import (
    embedding_pipeline,
    emit,
    flag_over_setting,
    model_options,
    positive_int,
    similarity,
    threshold_overrides,
)
from service.config import Settings

if TYPE_CHECKING:
    from filter.file_check import FileVerdict


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from filter.assembly import open_filter
    from filter.content import FileContent, read_content
    from filter.decide import NoFacePolicy, unreadable_verdict
    from filter.errors import ImageError
    from filter.file_check import FileVerdict, check_files
    from filter.images import BATCH_PIXELS, ImageLimits, read_image_bytes
    from filter.turned import searching_turned

    threshold, replica_threshold = threshold_overrides(settings, args)
    opened = open_filter(
        searching_turned(embedding_pipeline(settings, args)),
        Path(args.index),
        NoFacePolicy(flag_over_setting(args.no_face_policy, settings.no_face_policy)),
        threshold=threshold,
        replica_threshold=replica_threshold,
    )
    print(f"thresholds: {opened.thresholds.describe()}", file=sys.stderr)
    identity_filter = opened.filter
    limits = ImageLimits()
    pending: list[tuple[str, FileContent | None, str | None]] = []  # (path, content, error)
    pixels = 0

    def flush() -> None:
        nonlocal pixels
        readable = [content for _, content, _ in pending if content is not None]
        verdicts = iter(check_files(identity_filter, readable))
        for path, content, error in pending:
            result = (
                next(verdicts)
                if content is not None
                else FileVerdict(unreadable_verdict(), 0, None, error)
            )
            emit(_line(path, result, error))
        pending.clear()
        pixels = 0

    # Every frame, page and thumbnail of a file, and what could not be accounted for: the
    # rule `facegate batch` applies too (filter.content, filter.file_check). Batches of
    # --batch-size files, fewer where their decoded pixels would pass BATCH_PIXELS (a batch
    # is held decoded while it is checked); lines in input order.
    for path in args.images:
        try:
            content = read_content(read_image_bytes(Path(path), limits), limits)
        except ImageError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            pending.append((path, None, str(exc)))
            continue
        size = sum(view.pixels.shape[0] * view.pixels.shape[1] for view in content.views)
        if pending and pixels + size > BATCH_PIXELS:
            flush()
        pending.append((path, content, None))
        pixels += size
        if len(pending) >= args.batch_size:
            flush()
    if pending:
        flush()
    return 0


def _line(path: str, result: FileVerdict, error: str | None) -> dict[str, Any]:
    """The verdict row `batch` records too (`FileVerdict.row`), similarities rounded and
    the error only where there is one."""
    row = result.row()
    line: dict[str, Any] = {
        "path": path,
        **{key: value for key, value in row.items() if key != "error"},
        "max_similarity": _rounded(row["max_similarity"]),
        "replica_similarity": _rounded(row["replica_similarity"]),
    }
    if result.detail is not None:
        line["error"] = result.detail
        if error is None:
            print(f"error: {path}: {result.detail}", file=sys.stderr)
    return line


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def register(sub: Any) -> None:
    check = sub.add_parser("check", help="check images against the index; one JSON line each")
    check.add_argument("--index", required=True)
    check.add_argument(
        "--threshold",
        type=similarity,
        help="identity threshold (default FACEGATE_THRESHOLD, else the index's calibration)",
    )
    check.add_argument(
        "--replica-threshold",
        type=similarity,
        help="replica threshold (default FACEGATE_REPLICA_THRESHOLD, else the calibration)",
    )
    check.add_argument("--no-face-policy", choices=["reject", "pass"])
    check.add_argument("--batch-size", type=positive_int, default=16)
    check.add_argument("images", nargs="+", metavar="IMAGE")
    model_options(check)
    check.set_defaults(handler=cmd_check)
