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
    import math

    import numpy as np

    from filter.calibrate import calibrate_thresholds, same_person_floor_warning
    from filter.decide import DecisionThresholds, NoFacePolicy
    from filter.identity_filter import IdentityFilter
    from filter.index_lineage import acknowledge, loosenings, recalibrated_manifest
    from filter.index_release import index_thresholds, publish
    from filter.runtime import load_index_for

    skipped: list[dict[str, str]] = []
    total, batches = _non_member_batches(settings, args, skipped)
    pipeline = embedding_pipeline(settings, args)
    index_path = Path(args.index)
    index = load_index_for(pipeline, index_path)
    # Thresholds do not matter for evidence; the filter is used only to measure.
    measuring = IdentityFilter(pipeline, index, 1.0, NoFacePolicy.REJECT)
    identity_scores: list[float] = []
    replica_scores: list[float] = []
    no_face = unusable = 0
    with progress_bar(total, "calibrating") as bar:
        for images in batches:
            for evidence in measuring.evidence(images):
                if (
                    not evidence.searchable
                    or evidence.error is not None
                    or evidence.unsearched_faces
                ):
                    unusable += 1
                elif not evidence.face_matches:
                    no_face += 1
                else:
                    scores = [m.similarity for m in evidence.face_matches]
                    replica = evidence.replica
                    if not all(math.isfinite(s) for s in scores) or (
                        index.has_replicas and (replica is None or not replica.found)
                    ):
                        unusable += 1
                        continue
                    identity_scores.append(max(scores))
                    if replica is not None and index.has_replicas:
                        replica_scores.append(replica.similarity)
            bar.update(len(images))
    if not identity_scores:
        raise CliError("no face found in any non-member image; nothing to calibrate on")
    try:
        calibration = calibrate_thresholds(
            np.array(identity_scores),
            np.array(replica_scores) if index.has_replicas else None,
            args.target_false_reject,
            no_face,
        )
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
        # Never looser than the thresholds the index had (its calibration, else the
        # defaults) without an acknowledgement for this release (filter.index_lineage).
        before = index_thresholds(index)
        after = DecisionThresholds(calibration.threshold, calibration.replica_threshold)
        looser = loosenings(before, after)
        if looser and not args.allow_looser:
            raise CliError(
                f"not saved: these thresholds are looser than the index's ({'; '.join(looser)})"
                ". Save with --allow-looser to acknowledge that for this release (recorded in "
                "its manifest; servers watching the index then reload it), or calibrate for a "
                "lower --target-false-reject"
            )
        saved = index.with_calibration(payload)
        saved.manifest = recalibrated_manifest(index.manifest)
        if looser:
            acknowledge(
                saved.manifest,
                by="calibrate --save --allow-looser",
                replaces=index.fingerprint,
                before=before,
                after=after,
            )
        # A symlinked index gets a new release and the link flips; a folder is exchanged.
        written = publish(saved, index_path)
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
