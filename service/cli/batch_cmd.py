"""`facegate batch`: filter folders, globs or Parquet files on Ray Data into a manifest
and copies of the passed images (docs/batch.md). `batch` (and Ray) are imported only
when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.common import (
    embedding_spec,
    emit,
    flag_over_setting,
    model_options,
    positive_int,
    progress_bar,
    similarity,
    threshold_overrides,
)
from service.config import Settings

if TYPE_CHECKING:
    from batch.engine import RayOptions


def ray_options(
    args: argparse.Namespace, batch_size: int | None = None, in_flight: int = 0
) -> RayOptions:
    from batch.engine import RayOptions

    return RayOptions(
        address=args.address,
        actors=args.actors,
        batch_size=batch_size or args.batch_size,
        num_gpus=args.num_gpus,
        in_flight=in_flight,
    )


def cmd_batch(settings: Settings, args: argparse.Namespace) -> int:
    from batch.checking import FilterSpec
    from batch.manifest import COPY_ORIGINAL, COPY_PIXELS
    from batch.runner import execute_plan, plan_batch

    threshold, replica_threshold = threshold_overrides(settings, args)
    spec = FilterSpec(
        embedding=embedding_spec(settings, args),
        index_path=Path(args.index).absolute(),
        threshold=threshold,
        replica_threshold=replica_threshold,
        no_face_policy=flag_over_setting(args.no_face_policy, settings.no_face_policy),
        copy_mode=COPY_ORIGINAL if args.copy_original else COPY_PIXELS,
    )
    # Absolute: on a cluster, write tasks run in other working folders.
    out = Path(args.out).absolute()
    plan = plan_batch(args.inputs, out, spec, args.resume_by)
    print(f"thresholds: {plan.run.judged_by.thresholds.describe()}", file=sys.stderr)
    if plan.changed:
        print(
            f"{plan.changed} files changed since their manifest row: checked again (their "
            "old copies were removed)",
            file=sys.stderr,
        )
    if plan.unavailable:
        print(
            f"{plan.unavailable} files with a manifest row cannot be read now (moved, "
            "unmounted, unreachable): their rows and copies are kept",
            file=sys.stderr,
        )
    with progress_bar(len(plan.pending), "checking") as bar:
        summary = execute_plan(
            plan, out, spec, ray_options(args, in_flight=settings.batches_in_flight), bar.update
        )
    emit(summary)
    if summary["not_copied"]:
        # Passed, but nothing was handed on: a run that leaves work undone says so.
        print(
            f"{summary['not_copied']} passed images could not be copied to {summary['pass']} "
            "(their rows' error says why, reason not_copied): free the space or fix the "
            "path, then rerun the same command to check and copy them",
            file=sys.stderr,
        )
        return 1
    return 0


def ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="Ray cluster to run on (default RAY_ADDRESS; unset: a local Ray in this process)",
    )
    parser.add_argument("--actors", type=positive_int, default=1, help="model actors (default 1)")
    parser.add_argument(
        "--num-gpus",
        type=float,
        help="GPUs per actor (default 1 when the cluster has GPUs, else 0; fractions share one)",
    )


def register(sub: Any) -> None:
    batch = sub.add_parser(
        "batch", help="filter folders, globs or Parquet files on Ray Data (docs/batch.md)"
    )
    batch.add_argument("--index", required=True)
    batch.add_argument("--out", required=True, help="OUT/manifest/*.parquet and OUT/pass/")
    batch.add_argument("--threshold", type=similarity, help="as for check")
    batch.add_argument("--replica-threshold", type=similarity, help="as for check")
    batch.add_argument("--no-face-policy", choices=["reject", "pass"])
    batch.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="images per model call and per manifest fragment (default 32)",
    )
    batch.add_argument(
        "--copy-original",
        action="store_true",
        help="copy a passed file's original bytes (metadata and all) instead of its checked "
        "pixels re-encoded as PNG; only files whose every byte the content rule accounted "
        "for pass (docs/batch.md)",
    )
    batch.add_argument(
        "--resume-by",
        choices=["content", "size-mtime"],
        default="content",
        help="how a rerun knows a file is unchanged: the sha256 of every file (default), or "
        "size and modification time, which trusts the filesystem (docs/batch.md)",
    )
    ray_arguments(batch)
    batch.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folder (recursive), glob, image, or Parquet file of image bytes or paths",
    )
    model_options(batch)
    batch.set_defaults(handler=cmd_batch)
