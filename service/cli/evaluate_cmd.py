"""`facegate evaluate`: recall and false rejects on sets built from the generator and the
test photos, at calibrated thresholds, with DET curves (filter.evaluate does the work)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from service.cli.common import (
    CliError,
    configured_generator,
    embedding_pipeline,
    emit,
    model_options,
    positive_int,
    progress_bar,
    rate,
    seed_key,
)
from service.config import Settings

REPO_FACES = Path(__file__).resolve().parents[2] / "tests" / "data" / "faces"


def _faces_dir(args: argparse.Namespace) -> Path | None:
    if args.faces is not None:
        return Path(args.faces)
    default = Path(os.environ.get("FACEGATE_TEST_FACES", REPO_FACES))
    return default if (default / "identities").is_dir() else None


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from filter.augment import PROBE_NAMES
    from filter.det_plot import draw_det
    from filter.evaluate import EvaluationPlan, evaluate_generated, evaluate_leave_one_out
    from service.generators import latents_for

    if args.det is not None:  # before minutes of evaluation, not after
        det = Path(args.det)
        if det.is_dir():
            raise CliError(f"--det {det} is a folder; name the PNG file to write")
        if not det.parent.is_dir():
            raise CliError(f"--det {det}: the folder {det.parent} does not exist")
        if det.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise CliError(f"--det {det}: name a .png, .svg or .pdf file")
    transforms = tuple(args.transform or PROBE_NAMES)
    if transforms == ("none",):
        transforms = ()
    unknown = [t for t in transforms if t not in PROBE_NAMES]
    if unknown:
        raise CliError(
            f"unknown --transform {', '.join(unknown)}; known: {', '.join(PROBE_NAMES)}, or none"
        )
    plan = EvaluationPlan(
        gallery=args.gallery,
        near_copies=min(args.near_copies, args.gallery),
        sigmas=tuple(args.sigma or (0.1, 0.2, 0.3)),
        calibration=args.calibration,
        test=args.test,
        target_false_reject=args.target_false_reject,
        seed=args.seed,
        transforms=transforms,
        transformed=min(args.transformed, args.gallery),
    )
    from filter.calibrate import minimum_faces

    needed = minimum_faces(plan.target_false_reject)
    if plan.calibration < needed:  # before minutes of generation, not after
        raise CliError(
            f"--calibration {plan.calibration} is too few to calibrate a "
            f"{plan.target_false_reject:g} false-reject rate: it needs at least {needed} "
            "images with a face"
        )
    pipeline = embedding_pipeline(settings, args)
    generator = configured_generator(settings)
    key = seed_key(settings)
    total = (
        plan.gallery
        + plan.near_copies * len(plan.sigmas)
        + plan.transformed * len(plan.transforms)
        + plan.calibration
        + plan.test
    )
    with progress_bar(total, "evaluating") as bar:
        try:
            evaluation, _ = evaluate_generated(
                generator.generate,
                lambda seed, slot: latents_for(seed, slot, 0, generator.latent_dim, key),
                pipeline,
                plan,
                progress=bar.update,
            )
        except ValueError as exc:  # the calibration set, as generated, cannot calibrate
            raise CliError(f"cannot calibrate on the generated calibration set: {exc}") from None
    for line in evaluation.lines():
        emit({"generator": generator.name, **line})
    faces = _faces_dir(args)
    if faces is None:
        print("warning: no test faces found; skipping the real-photo set", file=sys.stderr)
    else:
        for line in evaluate_leave_one_out(faces / "identities", pipeline).lines():
            emit(line)
    if args.det is not None:
        draw_det(evaluation, Path(args.det))
        print(f"DET curves written to {args.det}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="measure recall and false rejects on generated and real-photo sets"
    )
    evaluate.add_argument("--gallery", type=positive_int, default=200, help="enrolled images")
    evaluate.add_argument("--near-copies", type=positive_int, default=200, help="per sigma")
    evaluate.add_argument(
        "--sigma", type=float, action="append", help="near-copy noise (default 0.1, 0.2, 0.3)"
    )
    evaluate.add_argument(
        "--transform",
        action="append",
        metavar="NAME",
        help="augmented copies to measure (repeat; default all of filter.augment's probe "
        "transforms; 'none' for none)",
    )
    evaluate.add_argument(
        "--transformed", type=positive_int, default=200, help="gallery images per transform"
    )
    evaluate.add_argument("--calibration", type=positive_int, default=1000)
    evaluate.add_argument("--test", type=positive_int, default=1000)
    evaluate.add_argument("--target-false-reject", type=rate, default=0.05)
    evaluate.add_argument("--seed", type=int, default=1000, help="gallery seed (others derive)")
    evaluate.add_argument("--faces", help="test faces folder (with identities/); default ours")
    evaluate.add_argument("--det", metavar="PNG", help="write DET curves to this file")
    model_options(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate, sigma=None, transform=None)
