"""`facegate check`: verdicts for image files, one JSON line each, in input order."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.common import (
    embedding_pipeline,
    emit,
    model_options,
    positive_int,
    similarity,
)
from service.config import Settings


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from filter.content import FileContent, read_content
    from filter.decide import NoFacePolicy, unreadable_verdict
    from filter.errors import ImageError
    from filter.file_check import FileVerdict, check_files
    from filter.identity_filter import IdentityFilter
    from filter.images import ImageLimits, read_image_bytes
    from filter.runtime import load_index_for, resolve_thresholds

    pipeline = embedding_pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))
    thresholds = resolve_thresholds(
        index,
        settings.threshold if args.threshold is None else args.threshold,
        settings.replica_threshold if args.replica_threshold is None else args.replica_threshold,
    )
    print(f"thresholds: {thresholds.describe()}", file=sys.stderr)
    policy = NoFacePolicy(args.no_face_policy or settings.no_face_policy)
    identity_filter = IdentityFilter(pipeline, index, thresholds.decision, policy)
    limits = ImageLimits()
    paths = list(args.images)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        contents: dict[int, FileContent] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                # Every frame, page and thumbnail, and what could not be accounted for:
                # the rule `facegate batch` applies too (filter.content, filter.file_check).
                contents[i] = read_content(read_image_bytes(Path(path), limits), limits)
            except ImageError as exc:
                errors[i] = str(exc)
                print(f"error: {path}: {exc}", file=sys.stderr)
        order = sorted(contents)
        checked = check_files(identity_filter, [contents[i] for i in order])
        verdicts = dict(zip(order, checked, strict=True))
        for i, path in enumerate(chunk):
            result = verdicts.get(i) or FileVerdict(unreadable_verdict(), 0, None, errors.get(i))
            verdict = result.verdict
            line: dict[str, Any] = {
                "path": path,
                "verdict": verdict.verdict,
                "reason": None if verdict.reason is None else str(verdict.reason),
                "faces": verdict.faces,
                "max_similarity": _rounded(verdict.max_similarity),
                "identity": verdict.identity,
                "replica_similarity": _rounded(verdict.replica_similarity),
                "images": result.images,
                "part": result.part,
            }
            if result.detail is not None:
                line["error"] = result.detail
                if i not in errors:
                    print(f"error: {path}: {result.detail}", file=sys.stderr)
            emit(line)
    return 0


def _rounded(value: float | None) -> float | None:
    if value is None or value != value:  # NaN: no neighbour was found
        return None
    return round(value, 6)


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
