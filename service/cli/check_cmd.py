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
    from filter.decide import NoFacePolicy, Reason, unreadable_verdict
    from filter.errors import ImageError
    from filter.identity_filter import IdentityFilter
    from filter.images import decode_image
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
    paths = list(args.images)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        decoded: dict[int, Any] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                decoded[i] = decode_image(Path(path))
            except ImageError as exc:
                errors[i] = str(exc)
                print(f"error: {path}: {exc}", file=sys.stderr)
        order = sorted(decoded)
        verdicts = dict(zip(order, identity_filter.check([decoded[i] for i in order]), strict=True))
        for i, path in enumerate(chunk):
            verdict = verdicts.get(i) or unreadable_verdict()
            line: dict[str, Any] = {
                "path": path,
                "verdict": verdict.verdict,
                "reason": None if verdict.reason is None else str(verdict.reason),
                "faces": verdict.faces,
                "max_similarity": _rounded(verdict.max_similarity),
                "identity": verdict.identity,
                "replica_similarity": _rounded(verdict.replica_similarity),
            }
            if i in errors:
                line["error"] = errors[i]
            elif verdict.detail is not None:
                line["error"] = verdict.detail
                print(f"error: {path}: {verdict.detail}", file=sys.stderr)
            if verdict.reason is Reason.UNSUPPORTED_GEOMETRY:
                height, width = decoded[i].shape[:2]
                line["error"] = f"a {width}x{height} image is too thin to search for faces"
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
