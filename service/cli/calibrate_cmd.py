"""`facegate calibrate`: a threshold from images known not to be enrolled."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
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
    restrict_to_owner,
    seed_key,
)
from service.config import Settings


def _non_member_batches(
    settings: Settings, args: argparse.Namespace, skipped: list[dict[str, str]]
) -> tuple[int, Iterator[list[Any]]]:
    """Batches of non-member images: files under --non-members, or fresh generator samples
    (kept in memory only: unfiltered samples are never written anywhere)."""
    from filter.errors import ImageError
    from filter.images import IMAGE_SUFFIXES, decode_image

    if args.non_members is not None:
        folder = Path(args.non_members)
        if not folder.is_dir():
            raise CliError(f"--non-members {folder} is not a folder")
        paths = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise CliError(f"no images found under {folder}")

        def from_files() -> Iterator[list[Any]]:
            for start in range(0, len(paths), 16):
                images = []
                for path in paths[start : start + 16]:
                    try:
                        images.append(decode_image(path))
                    except ImageError as exc:
                        skipped.append({"path": str(path), "error": str(exc)})
                        print(f"warning: skipped {path}: {exc}", file=sys.stderr)
                yield images

        return len(paths), from_files()

    import numpy as np

    from service.generators import latents_for

    generator = configured_generator(settings)
    key = seed_key(settings)
    total = args.generator_samples

    def from_generator() -> Iterator[list[Any]]:
        for start in range(0, total, 32):
            slots = range(start, min(start + 32, total))
            latents = np.stack(
                [latents_for(args.seed, s, 0, generator.latent_dim, key) for s in slots]
            )
            yield list(generator.generate(latents))

    return total, from_generator()


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index_release import editing

    if not args.save:
        return _calibrate(settings, args)
    # Held from reading the index to saving into it: an edit published meanwhile (an
    # opt-out added) would be undone by saving a copy of what was read.
    with editing(Path(args.index)):
        return _calibrate(settings, args)


def _calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from filter.assembly import load_index_for, measuring_filter
    from filter.calibrate import same_person_floor_warning
    from filter.decide import ImageEvidence
    from filter.evaluate import calibrate_on, score_evidence

    skipped: list[dict[str, str]] = []
    total, batches = _non_member_batches(settings, args, skipped)
    pipeline = embedding_pipeline(settings, args)
    index_path = Path(args.index)
    index = load_index_for(pipeline, index_path)
    # Thresholds do not matter for evidence; the filter is used only to measure.
    measuring = measuring_filter(pipeline, index)
    evidence: list[ImageEvidence] = []
    with progress_bar(total, "calibrating") as bar:
        for images in batches:
            evidence.extend(measuring.evidence(images))
            bar.update(len(images))
    scores = score_evidence("non-members", evidence, index.has_replicas)
    unusable = int(scores.unusable.sum())
    if not scores.scored.any():
        raise CliError("no face found in any non-member image; nothing to calibrate on")
    try:
        calibration = calibrate_on(scores, args.target_false_reject, index.has_replicas)
    except ValueError as exc:
        source_name = args.non_members or f"{args.generator_samples} generator samples"
        raise CliError(f"cannot calibrate on {source_name}: {exc}") from None
    floor = same_person_floor_warning(index.manifest["embedder"]["name"], calibration.threshold)
    if floor is not None:
        print(f"warning: {floor}", file=sys.stderr)
    payload = calibration.as_dict()
    payload["source"] = (
        {"non_members": str(Path(args.non_members).resolve())}
        if args.non_members is not None
        else {
            "generator_samples": args.generator_samples,
            "seed": args.seed,
            "generator": settings.generator,
        }
    )
    payload["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = {
        **payload,
        "images": total,
        "images_unusable": unusable,
        "skipped": skipped,
        "index": str(args.index),
        "index_vectors": index.vector_count,
    }
    if args.save:
        from filter.calibrate import LooserCalibrationError, recalibrated_index
        from filter.index_release import publish

        try:
            saved, looser = recalibrated_index(
                index,
                calibration,
                payload,
                allow_looser=args.allow_looser,
                by="calibrate --save --allow-looser",
            )
        except LooserCalibrationError as exc:
            raise CliError(
                f"not saved: these thresholds are looser than the index's ({exc}). Save with "
                "--allow-looser to acknowledge that for this release (recorded in its "
                "manifest; servers watching the index then reload it), or calibrate for a "
                "lower --target-false-reject"
            ) from None
        # A symlinked index gets a new release and the link flips; a folder is exchanged.
        written = publish(saved, index_path, read=index.fingerprint)
        restrict_to_owner(written)
        report["saved"] = str(index_path)
        report["written"] = str(written)
        report["looser"] = looser
        print(
            f"saved the calibration into {index_path}: identity threshold "
            f"{calibration.threshold}, replica threshold {calibration.replica_threshold}"
            + (f" (looser, acknowledged: {'; '.join(looser)})" if looser else ""),
            file=sys.stderr,
        )
    emit(report)
    return 0


def register(sub: Any) -> None:
    calibrate = sub.add_parser("calibrate", help="pick thresholds from non-member images")
    calibrate.add_argument("--index", required=True)
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--non-members", metavar="DIR", help="images of people not in the index")
    source.add_argument(
        "--generator-samples",
        type=positive_int,
        metavar="N",
        help="use N fresh samples of the configured generator instead",
    )
    calibrate.add_argument("--seed", type=int, default=2, help="seed for --generator-samples")
    calibrate.add_argument("--target-false-reject", type=rate, default=0.05)
    calibrate.add_argument(
        "--save",
        action="store_true",
        help="write the calibration into the index folder (used when no threshold is given); "
        "a symlinked index gets a new release",
    )
    calibrate.add_argument(
        "--allow-looser",
        action="store_true",
        help="with --save: save even if a threshold is looser than the index's current one "
        "(its calibration, else the defaults); recorded in the index's manifest",
    )
    model_options(calibrate)
    calibrate.set_defaults(handler=cmd_calibrate)
