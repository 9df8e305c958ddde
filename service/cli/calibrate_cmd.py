"""`facegate calibrate`: a threshold from images known not to be enrolled."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.cli.common import (
    CliError,
    configured_generator,
    embedding_pipeline,
    emit,
    model_options,
    progress_bar,
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
    total = args.generator_samples

    def fromconfigured_generator() -> Iterator[list[Any]]:
        for start in range(0, total, 32):
            slots = range(start, min(start + 32, total))
            latents = np.stack([latents_for(args.seed, s, 0, generator.latent_dim) for s in slots])
            yield list(generator.generate(latents))

    return total, fromconfigured_generator()


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    import numpy as np

    from filter.calibrate import calibrate_threshold
    from filter.runtime import load_index_for

    skipped: list[dict[str, str]] = []
    total, batches = _non_member_batches(settings, args, skipped)
    pipeline = embedding_pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))
    maxima: list[float] = []
    no_face = 0
    with progress_bar(total, "calibrating") as bar:
        for images in batches:
            for result in pipeline.embed_images(images):
                if not result.faces:
                    no_face += 1
                    continue
                matches = index.search(result.embeddings)
                maxima.append(max(m.similarity for m in matches))
            bar.update(len(images))
    if not maxima:
        raise CliError("no face found in any non-member image; nothing to calibrate on")
    calibration = calibrate_threshold(np.array(maxima), args.target_false_reject, no_face)
    payload = calibration.as_dict()
    payload.update(
        {
            "images": total,
            "skipped": skipped,
            "index": str(args.index),
            "index_vectors": index.vector_count,
            "current_threshold": settings.threshold,
        }
    )
    emit(payload)
    return 0


def register(sub: Any) -> None:
    calibrate = sub.add_parser("calibrate", help="pick a threshold from non-member images")
    calibrate.add_argument("--index", required=True)
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--non-members", metavar="DIR", help="images of people not in the index")
    source.add_argument(
        "--generator-samples",
        type=int,
        metavar="N",
        help="use N fresh samples of the configured generator instead",
    )
    calibrate.add_argument("--seed", type=int, default=2, help="seed for --generator-samples")
    calibrate.add_argument("--target-false-reject", type=float, default=0.05)
    model_options(calibrate)
    calibrate.set_defaults(handler=cmd_calibrate)
