"""`facegate check`: verdicts for image files, one JSON line each, in input order."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.common import embedding_pipeline, emit, model_options
from service.config import Settings


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from filter.decide import NoFacePolicy, unreadable_verdict
    from filter.errors import ImageError
    from filter.identity_filter import IdentityFilter
    from filter.images import decode_image
    from filter.runtime import load_index_for

    pipeline = embedding_pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))
    threshold = settings.threshold if args.threshold is None else args.threshold
    policy = NoFacePolicy(args.no_face_policy or settings.no_face_policy)
    identity_filter = IdentityFilter(pipeline, index, threshold, policy)
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
                "max_similarity": None
                if verdict.max_similarity is None
                else round(verdict.max_similarity, 6),
                "identity": verdict.identity,
            }
            if i in errors:
                line["error"] = errors[i]
            emit(line)
    return 0


def register(sub: Any) -> None:
    check = sub.add_parser("check", help="check images against the index; one JSON line each")
    check.add_argument("--index", required=True)
    check.add_argument("--threshold", type=float, help="default FACEGATE_THRESHOLD")
    check.add_argument("--no-face-policy", choices=["reject", "pass"])
    check.add_argument("--batch-size", type=int, default=16)
    check.add_argument("images", nargs="+", metavar="IMAGE")
    model_options(check)
    check.set_defaults(handler=cmd_check)
