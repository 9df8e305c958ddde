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
    from filter.decide import NoFacePolicy, unreadable_verdict
    from filter.errors import ImageError
    from filter.identity_filter import IdentityFilter
    from filter.images import BATCH_PIXELS, decode_image
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
    pending: list[tuple[str, Any, str | None]] = []  # (path, pixels or None, error)
    pixels = 0

    def flush() -> None:
        nonlocal pixels
        readable = [image for _, image, _ in pending if image is not None]
        verdicts = iter(identity_filter.check(readable))
        for path, image, error in pending:
            verdict = unreadable_verdict() if image is None else next(verdicts)
            emit(_line(path, verdict, image, error))
        pending.clear()
        pixels = 0

    # Batches of --batch-size images, fewer where their decoded pixels would pass
    # BATCH_PIXELS (a batch is held decoded while it is checked); lines in input order.
    for path in args.images:
        try:
            image = decode_image(Path(path))
        except ImageError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            pending.append((path, None, str(exc)))
            continue
        size = image.shape[0] * image.shape[1]
        if pending and pixels + size > BATCH_PIXELS:
            flush()
        pending.append((path, image, None))
        pixels += size
        if len(pending) >= args.batch_size:
            flush()
    if pending:
        flush()
    return 0


def _line(path: str, verdict: Any, image: Any, error: str | None) -> dict[str, Any]:
    from filter.decide import Reason

    line: dict[str, Any] = {
        "path": path,
        "verdict": verdict.verdict,
        "reason": None if verdict.reason is None else str(verdict.reason),
        "faces": verdict.faces,
        "max_similarity": _rounded(verdict.max_similarity),
        "identity": verdict.identity,
        "replica_similarity": _rounded(verdict.replica_similarity),
    }
    if error is not None:
        line["error"] = error
    elif verdict.detail is not None:
        line["error"] = verdict.detail
        print(f"error: {path}: {verdict.detail}", file=sys.stderr)
    if verdict.reason is Reason.UNSUPPORTED_GEOMETRY:
        height, width = image.shape[:2]
        line["error"] = f"a {width}x{height} image is too thin to search for faces"
    return line


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
