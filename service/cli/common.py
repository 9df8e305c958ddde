"""Helpers shared by the commands: errors, JSON output, model loading, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Never, TypeVar

from service.config import Settings
from service.embedding import embedding_spec as settings_embedding_spec

if TYPE_CHECKING:
    # Only for mypy: the commands import models, torch and tqdm when they run.
    from tqdm import tqdm

    from filter.assembly import EmbeddingSpec
    from filter.gallery import GalleryReport
    from filter.identity_filter import FaceEmbeddingPipeline
    from service.generators import Generator

T = TypeVar("T")

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exit 2."""


def emit(payload: object) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def flag_over_setting(flag: T | None, setting: T) -> T:
    """A command-line flag, where given (not None), wins over its FACEGATE_* setting."""
    return setting if flag is None else flag


def threshold_overrides(
    settings: Settings, args: argparse.Namespace
) -> tuple[float | None, float | None]:
    """--threshold and --replica-threshold over FACEGATE_THRESHOLD and
    FACEGATE_REPLICA_THRESHOLD (None: the index's calibration, else the defaults)."""
    return (
        flag_over_setting(args.threshold, settings.threshold),
        flag_over_setting(args.replica_threshold, settings.replica_threshold),
    )


def embedding_spec(settings: Settings, args: argparse.Namespace) -> EmbeddingSpec:
    """What the options and settings choose: embedder, models, device, detector (a
    picklable `filter.assembly.EmbeddingSpec`, which batch actors build for themselves)."""
    return settings_embedding_spec(
        settings,
        embedder=getattr(args, "embedder", None),
        models_dir=getattr(args, "models_dir", None),
        device=getattr(args, "device", None),
        detector=getattr(args, "detector", None),
    )


def embedding_pipeline(settings: Settings, args: argparse.Namespace) -> FaceEmbeddingPipeline:
    """Detector, aligner and embedder as the options and settings choose them."""
    return embedding_spec(settings, args).build()


def configured_generator(settings: Settings) -> Generator:
    """The configured generator, on the CPU (operator tools run beside the service)."""
    from service.generators import load_generator

    return load_generator(
        settings.generator,
        Path(settings.models_dir),
        "cpu",
        settings.generator_path,
        settings.generator_latent_dim,
    )


def warn_enrolment(report: GalleryReport, has_replicas: bool) -> None:
    """Say on stderr what of a gallery was not enrolled as faces, and why (`index build`
    and `index add` alike): images with no face, too thin to search, or with too many
    faces; files skipped as unreadable or ignored; and each identity none of whose images
    gave a face to enrol, which the filter cannot recognise whatever the thresholds."""
    kept = "enrolled for replicas only" if has_replicas else "not enrolled"
    for path in report.no_face:
        print(f"warning: no face found in {path}; {kept}", file=sys.stderr)
    for path in report.unsearchable:
        print(f"warning: {path} is too thin to search for faces; {kept}", file=sys.stderr)
    for path in report.too_many_faces:
        print(
            f"warning: {path} holds more faces than the filter searches in one image; {kept}",
            file=sys.stderr,
        )
    for item in report.skipped:
        print(f"warning: skipped {item['path']}: {item['error']}", file=sys.stderr)
    for item in report.partly_enrolled:
        print(
            f"warning: {item['path']}: {item['error']}; its earlier frames were enrolled "
            "(split it into one file per frame to enrol the rest)",
            file=sys.stderr,
        )
    outside = [item["path"] for item in report.ignored if item["why"] != "not an image"]
    for path in outside:
        print(
            f"warning: {path} is not in an identity folder (GALLERY/<identity>/...); not enrolled",
            file=sys.stderr,
        )
    others = [item["path"] for item in report.ignored if item["why"] == "not an image"]
    if others:  # captions and metadata beside images: one line, not one each
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        print(
            f"warning: {len(others)} files under identity folders are not images and were "
            f"not enrolled ({shown}; the summary's `ignored` lists them)",
            file=sys.stderr,
        )
    held = "only near-copies of its images are" if has_replicas else "nothing of it is"
    for identity in report.empty_identities:
        print(
            f"warning: identity {identity} has no enrolled face (none of its images showed "
            f"one the filter can search): its face is not held back, {held}; add a clear "
            "photo of it",
            file=sys.stderr,
        )


def restrict_to_owner(folder: Path) -> None:
    """An index says who is in the training set: owner-only folder (0700) and files (0600)."""
    folder.chmod(0o700)
    for path in folder.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)


def configured_seed_key(settings: Settings) -> bytes | None:
    """FACEGATE_SEED_KEY_FILE's key, read as the server reads it (`load_seed_key`); None
    when unset (each command says what that means for it); CliError when unusable."""
    from service.generators import load_seed_key

    try:
        return load_seed_key(settings.seed_key_file)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def audit_key(settings: Settings) -> bytes | None:
    """The key the audit log's identity pseudonyms derive from, as the server derives it
    (FACEGATE_AUDIT_KEY_FILE, else the seed key); None when neither is set."""
    from service.errors import StartupError
    from service.security import audit_master_key

    seed = configured_seed_key(settings)
    try:
        return audit_master_key(settings, seed)
    except StartupError as exc:
        raise CliError(str(exc)) from None


def seed_key(settings: Settings) -> bytes | None:
    """FACEGATE_SEED_KEY_FILE's key, so that operator tools draw the latents the server does."""
    key = configured_seed_key(settings)
    if key is None:
        print(
            "warning: FACEGATE_SEED_KEY_FILE is not set; drawing unkeyed latents (they match "
            "only a server started with FACEGATE_ALLOW_UNKEYED_SEEDS=true)",
            file=sys.stderr,
        )
    return key


class ProgressBar:
    """A tqdm bar on stderr (silent when stderr is not a terminal), whose `update` fits the
    `progress: Callable[[int], None]` the filter and batch take."""

    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self._bar: tqdm[Never] = tqdm(
            total=total, desc=label, unit="img", disable=not sys.stderr.isatty(), file=sys.stderr
        )

    def update(self, count: int) -> None:
        self._bar.update(count)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def progress_bar(total: int, label: str) -> ProgressBar:
    return ProgressBar(total, label)


def model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        help="model folder (default FACEGATE_MODELS_DIR, else the installation's models/ or "
        "~/.local/share/facegate/models)",
    )
    parser.add_argument(
        "--embedder", choices=["sface", "facenet"], help="default FACEGATE_EMBEDDER"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default FACEGATE_DEVICE")
    parser.add_argument(
        "--detector",
        choices=["mtcnn-batched", "mtcnn"],
        help="MTCNN implementation (default FACEGATE_DETECTOR or mtcnn-batched); an index "
        "only loads with the detector that built it",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def similarity(text: str) -> float:
    """argparse type: a cosine similarity threshold in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between -1 and 1, got {value}")
    return value


def rate(text: str) -> float:
    """argparse type: a rate strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value
