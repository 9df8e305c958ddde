"""`facegate index build|info|demo` (and `add|remove`, in index_edit_cmd): the index."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli import batch_cmd, index_edit_cmd
from service.cli.common import (
    CliError,
    configured_generator,
    embedding_pipeline,
    embedding_spec,
    emit,
    model_options,
    positive_int,
    progress_bar,
    restrict_to_owner,
    seed_key,
    warn_enrolment,
)
from service.config import Settings

if TYPE_CHECKING:
    from filter.decide import DecisionThresholds
    from filter.gallery import GalleryReport
    from filter.identity_filter import FaceEmbeddingPipeline
    from filter.index import FaissIdentityIndex


def cmd_index_build(settings: Settings, args: argparse.Namespace) -> int:
    from filter.assembly import detector_manifest
    from filter.gallery import build_gallery_index
    from filter.gallery_files import gallery_images
    from filter.index_store import check_replaceable
    from filter.replica import MIN_REPLICA_IMAGES
    from filter.vector_table import APPROXIMATE_TYPES

    out = Path(args.out)
    if out.is_symlink():  # before the enrolment, not after it
        raise CliError(
            f"{out} is a symlink to a release: build to a new folder, then "
            f"`facegate index publish NEW {out}` (it verifies the release and flips the link)"
        )
    check_replaceable(out)
    replaced = _replaced_thresholds(out)
    if not args.allow_looser:
        _refuse_looser(replaced, _uncalibrated(replaced), out)
    gallery = Path(args.gallery)
    total = len(list(gallery_images(gallery)))
    pipeline = embedding_pipeline(settings, args)
    with progress_bar(total, "enrolling") as bar:
        if args.ray:
            index, report = build_on_ray(settings, args, pipeline, bar.update)
        else:
            index, report = build_gallery_index(
                gallery,
                pipeline,
                detector_settings=detector_manifest(pipeline),
                index_type=args.index_type,
                progress=bar.update,
            )
    if replaced is not None:
        _acknowledge_looser(index, replaced, out, args.allow_looser)
    index.save(out)
    restrict_to_owner(out)
    summary = {
        "index": str(args.out),
        "index_type": index.manifest["index_type"],
        "fingerprint": index.fingerprint,
        **report.as_dict(),
    }
    emit(summary)
    if args.index_type in APPROXIMATE_TYPES:
        print(
            f"warning: a {args.index_type} index searches approximately and can miss a match "
            "that exact search finds (README 'Index at scale'); use it only with its recall "
            "measured on this gallery",
            file=sys.stderr,
        )
    if not index.has_replicas:
        print(
            f"warning: the replica signal is off: it needs at least {MIN_REPLICA_IMAGES} "
            f"training images and the gallery has {report.images}",
            file=sys.stderr,
        )
    warn_enrolment(report, index.has_replicas)
    return 0


def _replaced_thresholds(out: Path) -> DecisionThresholds | None:
    """The thresholds the index at OUT applies now, which a rebuild replaces (None: no
    index there, or one that does not load, which protects nothing)."""
    from filter.errors import FilterError
    from filter.index import FaissIdentityIndex
    from filter.index_release import index_thresholds
    from filter.index_store import MANIFEST_FILE

    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        return index_thresholds(FaissIdentityIndex.load(out))
    except FilterError:
        return None


def _uncalibrated(replaced: DecisionThresholds | None) -> DecisionThresholds | None:
    """What a rebuilt index applies: no calibration, so the defaults."""
    from filter.decide import DecisionThresholds
    from filter.thresholds import DEFAULT_IDENTITY_THRESHOLD, DEFAULT_REPLICA_THRESHOLD

    if replaced is None:
        return None
    replica = DEFAULT_REPLICA_THRESHOLD if replaced.replica is not None else None
    return DecisionThresholds(DEFAULT_IDENTITY_THRESHOLD, replica)


def _rebuild_refusal(out: Path) -> Callable[[list[str]], Exception]:
    def refuse(looser: list[str]) -> Exception:
        return CliError(
            f"{out} holds an index whose thresholds are stricter than the rebuilt one's "
            f"({'; '.join(looser)}; a rebuild starts uncalibrated): build to a new --out, "
            f"calibrate it (`facegate calibrate --index NEW ... --save`), then replace {out}; "
            "or give --allow-looser (recorded in the new index's manifest)"
        )

    return refuse


def _refuse_looser(
    before: DecisionThresholds | None, after: DecisionThresholds | None, out: Path
) -> None:
    """A rebuild over a calibrated index starts uncalibrated: where that loosens what the
    index at OUT applies, refuse before the enrolment unless the operator says so (a
    server restarted on it would release faces the old index held back, and a reload
    would refuse it). The rule itself is applied to the built index (_acknowledge_looser)."""
    from filter.index_lineage import loosenings

    looser = loosenings(before, after) if before is not None and after is not None else []
    if looser:
        raise _rebuild_refusal(out)(looser)


def _acknowledge_looser(
    index: FaissIdentityIndex, replaced: DecisionThresholds, out: Path, allow_looser: bool
) -> None:
    from filter.index_lineage import accept_looser
    from filter.index_release import fingerprint_at, index_thresholds

    looser = accept_looser(
        index.manifest,
        before=replaced,
        after=index_thresholds(index),
        allowed=allow_looser,
        by="index build --allow-looser",
        replaces=fingerprint_at(out),
        refuse=_rebuild_refusal(out),
    )
    if looser:
        print(
            f"facegate: warning: {out} is replaced by a looser index ({'; '.join(looser)}), "
            "as --allow-looser allows (recorded in its manifest)",
            file=sys.stderr,
        )


def build_on_ray(
    settings: Settings,
    args: argparse.Namespace,
    pipeline: FaceEmbeddingPipeline,
    progress: Callable[[int], None],
) -> tuple[FaissIdentityIndex, GalleryReport]:
    """The gallery embedded by Ray actors, enrolled here: the same index (docs/batch.md)."""
    from batch.engine import ray_session
    from batch.gallery import enrol_gallery_on_ray
    from filter.assembly import detector_manifest
    from filter.gallery import Enrolment, finish_gallery_index

    gallery = Path(args.gallery)
    enrolment = Enrolment(pipeline)
    with ray_session(args.address):
        enrol_gallery_on_ray(
            gallery,
            embedding_spec(settings, args),
            enrolment,
            batch_cmd.ray_options(args, batch_size=64),
            progress,
        )
    return finish_gallery_index(
        gallery,
        enrolment,
        detector_settings=detector_manifest(pipeline),
        index_type=args.index_type,
    )


def cmd_index_info(settings: Settings, args: argparse.Namespace) -> int:
    from filter.assembly import load_index_for
    from filter.index import FaissIdentityIndex
    from filter.index_lineage import EDITS, scrubbed_history

    if args.verify:
        # The server's own startup checks: this embedder, this detector, self-test.
        index = load_index_for(embedding_pipeline(settings, args), Path(args.index))
    else:
        index = FaissIdentityIndex.load(Path(args.index))
    manifest = dict(index.manifest)
    history = manifest.get(EDITS)
    scrubbed = scrubbed_history(history, None)
    if isinstance(history, list) and scrubbed != history:
        # Written by an earlier facegate, which named the identities an edit touched.
        manifest[EDITS] = scrubbed
        print(
            "facegate: warning: this index's edit history names identities (written by an "
            "earlier facegate); shown here as counts. The next `index add` or `index remove` "
            "rewrites it as counts and keyed hashes",
            file=sys.stderr,
        )
    emit({**manifest, "fingerprint": index.fingerprint})
    return 0


def cmd_index_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Enrol faces sampled from the generator as synthetic 'training identities'."""
    from service.demo import build_demo_index

    pipeline = embedding_pipeline(settings, args)
    generator = configured_generator(settings)
    index = build_demo_index(
        generator,
        pipeline,
        identities=args.identities,
        seed=args.seed,
        seed_key=seed_key(settings),
    )
    index.save(Path(args.out))
    restrict_to_owner(Path(args.out))
    emit(
        {
            "index": str(args.out),
            "identities": index.identity_count,
            "vectors": index.vector_count,
            "fingerprint": index.fingerprint,
            "seed": args.seed,
        }
    )
    return 0


def register(sub: Any) -> None:
    index = sub.add_parser("index", help="identity index").add_subparsers(
        dest="index_cmd", required=True
    )
    build = index.add_parser(
        "build",
        help="build an index from every image below GALLERY/<identity>/ (any suffix, every frame)",
    )
    build.add_argument("gallery")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument(
        "--allow-looser",
        action="store_true",
        help="replace an index at --out whose thresholds (its calibration) are stricter than "
        "the rebuilt, uncalibrated one's; recorded in the new index's manifest",
    )
    build.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivf"], default="auto")
    build.add_argument(
        "--ray",
        action="store_true",
        help="embed the gallery on Ray Data (same index as without; docs/batch.md)",
    )
    batch_cmd.ray_arguments(build)
    model_options(build)
    build.set_defaults(handler=cmd_index_build)
    info = index.add_parser("info", help="print the index manifest as JSON")
    info.add_argument("index")
    info.add_argument(
        "--verify",
        action="store_true",
        help="also check it against the configured models, as the server does at startup",
    )
    model_options(info)
    info.set_defaults(handler=cmd_index_info)
    demo = index.add_parser("demo", help="enrol generator samples as synthetic identities (demo)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--identities", type=positive_int, default=200)
    demo.add_argument("--seed", type=int, default=1)
    model_options(demo)
    demo.set_defaults(handler=cmd_index_demo)
    index_edit_cmd.register_into(index)
