"""`facegate index add|remove|publish`: enrol or remove identities without a rebuild, and
publish an index where live servers pick it up (atomically, through a symlink)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.cli.common import CliError, embedding_pipeline, emit, model_options, progress_bar
from service.config import Settings


def _destination(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.index)


def _report(index: Any, report: Any, written: Path, args: argparse.Namespace) -> int:
    report.fingerprint_after = index.fingerprint
    emit({"index": str(_destination(args)), "written": str(written), **report.as_dict()})
    if report.calibration.startswith("dropped"):
        print(f"facegate: the saved calibration was {report.calibration}", file=sys.stderr)
    if report.replicas.startswith("off"):
        print(f"facegate: warning: replica signal {report.replicas}", file=sys.stderr)
    return 0


def cmd_index_add(settings: Settings, args: argparse.Namespace) -> int:
    from filter.gallery import gallery_images
    from filter.index_edit import add_gallery
    from filter.index_release import publish
    from filter.runtime import load_index_for

    gallery = Path(args.gallery)
    total = len(list(gallery_images(gallery)))
    pipeline = embedding_pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))  # refuses another embedder/detector
    with progress_bar(total, "enrolling") as bar:
        edited, report = add_gallery(
            index, pipeline, gallery, progress=bar.update, index_name=str(_destination(args))
        )
    written = publish(edited, _destination(args))
    kept = "enrolled for replicas only" if edited.has_replicas else "not enrolled"
    for path in report.gallery.no_face if report.gallery else []:
        print(f"warning: no face found in {gallery / path}; {kept}", file=sys.stderr)
    return _report(edited, report, written, args)


def cmd_index_remove(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index import FaissIdentityIndex
    from filter.index_edit import remove_identities
    from filter.index_release import publish

    if not args.identity:
        raise CliError("name at least one --identity to remove")
    index = FaissIdentityIndex.load(Path(args.index))  # integrity and self-test
    edited, report = remove_identities(index, args.identity)
    written = publish(edited, _destination(args))
    return _report(edited, report, written, args)


def cmd_index_publish(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index import FaissIdentityIndex
    from filter.index_release import publish_folder

    release = publish_folder(Path(args.source), Path(args.link), name=args.name)
    emit(
        {
            "link": str(args.link),
            "release": str(release),
            "fingerprint": FaissIdentityIndex.load(release).fingerprint,
        }
    )
    print(
        f"{args.link} -> {release}; servers watching it reload by themselves, others on SIGHUP",
        file=sys.stderr,
    )
    return 0


def register_into(index: Any) -> None:
    """Add the `add` and `remove` subcommands to the `index` group."""
    add = index.add_parser(
        "add", help="enrol GALLERY/<identity>/* into an existing index (no rebuild)"
    )
    add.add_argument("index")
    add.add_argument("gallery")
    add.add_argument(
        "--out", help="write the result here instead of replacing INDEX (then calibrate it)"
    )
    model_options(add)
    add.set_defaults(handler=cmd_index_add)
    remove = index.add_parser("remove", help="remove identities from an index (no rebuild)")
    remove.add_argument("index")
    remove.add_argument(
        "--identity", action="append", metavar="ID", help="identity id; repeat for several"
    )
    remove.add_argument("--out", help="write the result here instead of replacing INDEX")
    remove.set_defaults(handler=cmd_index_remove)
    publish = index.add_parser(
        "publish",
        help="copy a built index into LINK's releases/ folder, verify it, flip LINK to it",
    )
    publish.add_argument("source", help="a built index folder")
    publish.add_argument("link", help="the symlink servers read (FACEGATE_INDEX_PATH)")
    publish.add_argument("--name", help="release name (default: the source folder's name)")
    publish.set_defaults(handler=cmd_index_publish)
