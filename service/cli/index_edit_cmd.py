"""`facegate index add|remove|publish`: enrol or remove identities without a rebuild, and
publish an index where live servers pick it up (atomically, through a symlink)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.common import (
    CliError,
    audit_key,
    embedding_pipeline,
    emit,
    model_options,
    progress_bar,
    restrict_to_owner,
    warn_enrolment,
)
from service.config import Settings

if TYPE_CHECKING:
    from filter.index import FaissIdentityIndex
    from filter.index_edit import EditReport


def _destination(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.index)


def _edit_key(settings: Settings) -> bytes | None:
    """The operator's key for keyed hashes in the edit history (None: counts only): the
    audit log's (FACEGATE_AUDIT_KEY_FILE, else the seed key), so `facegate audit hash`
    finds a person in both."""
    key = audit_key(settings)
    if key is None:
        print(
            "facegate: neither FACEGATE_AUDIT_KEY_FILE nor FACEGATE_SEED_KEY_FILE is set: the "
            "edit history records how many identities changed, without keyed hashes",
            file=sys.stderr,
        )
    return key


def _report(
    index: FaissIdentityIndex, report: EditReport, written: Path, args: argparse.Namespace
) -> dict[str, Any]:
    report.fingerprint_after = index.fingerprint
    summary = {"index": str(_destination(args)), "written": str(written), **report.as_dict()}
    if report.calibration.startswith("carried"):
        print(f"facegate: the saved calibration was {report.calibration}", file=sys.stderr)
    if report.replicas.startswith("off"):
        print(f"facegate: warning: replica signal {report.replicas}", file=sys.stderr)
    return summary


def _publish(edited: FaissIdentityIndex, read: str, args: argparse.Namespace) -> Path:
    """Write the edit of the index whose fingerprint was `read`; in place, refused if
    the index changed meanwhile (its change would be undone)."""
    from filter.index_release import publish

    destination = _destination(args)
    in_place = os.path.realpath(destination) == os.path.realpath(args.index)
    written = publish(edited, destination, read=read if in_place else None)
    restrict_to_owner(written)
    return written


def cmd_index_add(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index_release import editing

    with editing(_destination(args)):
        return _index_add(settings, args)


def cmd_index_remove(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index_release import editing

    if not args.identity:
        raise CliError("name at least one --identity to remove")
    with editing(_destination(args)):
        return _index_remove(settings, args)


def _index_add(settings: Settings, args: argparse.Namespace) -> int:
    from filter.assembly import load_index_for
    from filter.gallery_files import gallery_images
    from filter.index_edit import add_gallery

    gallery = Path(args.gallery)
    total = len(list(gallery_images(gallery)))
    key = _edit_key(settings)
    pipeline = embedding_pipeline(settings, args)
    index = load_index_for(pipeline, Path(args.index))  # refuses another embedder/detector
    with progress_bar(total, "enrolling") as bar:
        edited, report = add_gallery(
            index,
            pipeline,
            gallery,
            progress=bar.update,
            index_name=str(_destination(args)),
            key=key,
        )
    written = _publish(edited, index.fingerprint, args)
    if report.gallery is not None:
        warn_enrolment(report.gallery, edited.has_replicas)
    emit(_report(edited, report, written, args))
    return 0


def _index_remove(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index import FaissIdentityIndex
    from filter.index_edit import remove_identities
    from filter.index_release import releases_holding

    key = _edit_key(settings)
    source = Path(args.index)
    linked = source.is_symlink()
    before = source.resolve()
    index = FaissIdentityIndex.load(source)  # integrity and self-test
    edited, report = remove_identities(index, args.identity, key)
    written = _publish(edited, index.fingerprint, args)
    summary = _report(edited, report, written, args)
    # What still holds the removed vectors: older releases beside the old target (a
    # symlinked index; the live one is the new release, unless the result went to --out),
    # or, for a plain folder written to --out, the folder itself (left alone, as asked).
    # A plain folder replaced in place is gone: the exchange removed it.
    holding: list[Path] = []
    prunable: list[Path] = []
    if linked:
        holding = releases_holding([before], args.identity, exclude=written)
        prunable = [folder for folder in holding if folder != source.resolve()]
    elif args.out is not None:
        holding = releases_holding([before], args.identity, only=True)
    pruned = prunable if args.prune_releases else []
    for folder in pruned:
        shutil.rmtree(folder)
    summary["releases_pruned"] = [str(folder) for folder in pruned]
    summary["still_holding_removed"] = [str(f) for f in holding if f not in pruned]
    for folder in holding:
        if folder in pruned:
            continue
        why = (
            "delete it, or rerun with --prune-releases"
            if folder in prunable
            else "the index you edited with --out, or the live one until you publish the result"
        )
        print(
            f"facegate: {folder} still holds the removed identities' vectors ({why})",
            file=sys.stderr,
        )
    emit(summary)
    return 0


def cmd_index_publish(settings: Settings, args: argparse.Namespace) -> int:
    from filter.index_lineage import describe_acknowledgement
    from filter.index_release import editing, publish_folder

    with editing(Path(args.link)):
        published = publish_folder(
            Path(args.source),
            Path(args.link),
            name=args.name,
            allow_looser=args.allow_looser,
            discard_live_changes=args.discard_live_changes,
        )
    emit(
        {
            "link": str(args.link),
            "release": str(published.release),
            "fingerprint": published.fingerprint,
            "looser": published.looser,
            "looser_acknowledged": published.acknowledgement,
        }
    )
    if published.undone is not None:
        print(
            f"facegate: warning: --discard-live-changes: this release undoes {published.undone}",
            file=sys.stderr,
        )
    if published.looser and published.acknowledgement is not None:
        print(
            f"facegate: warning: this release is looser than the one it replaces "
            f"({'; '.join(published.looser)}), "
            f"{describe_acknowledgement(published.acknowledgement)}",
            file=sys.stderr,
        )
    print(
        f"{args.link} -> {published.release}; servers watching it reload by themselves, "
        "others on SIGHUP",
        file=sys.stderr,
    )
    return 0


def register_into(index: Any) -> None:
    """Add the `add`, `remove` and `publish` subcommands to the `index` group."""
    add = index.add_parser(
        "add",
        help="enrol every image below GALLERY/<identity>/ into an existing index (no rebuild)",
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
    remove.add_argument(
        "--prune-releases",
        action="store_true",
        help="delete the older release folders that still hold the removed identities "
        "(never the live one); without it they are listed",
    )
    remove.set_defaults(handler=cmd_index_remove)
    publish = index.add_parser(
        "publish",
        help="copy a built index into LINK's releases/ folder, verify it, flip LINK to it",
    )
    publish.add_argument("source", help="a built index folder")
    publish.add_argument("link", help="the symlink servers read (FACEGATE_INDEX_PATH)")
    publish.add_argument("--name", help="release name (default: the source folder's name)")
    publish.add_argument(
        "--allow-looser",
        action="store_true",
        help="publish even though its thresholds are looser than the current index's; the "
        "acknowledgement is recorded in this release's manifest (servers then reload it)",
    )
    publish.add_argument(
        "--discard-live-changes",
        action="store_true",
        help="publish even though SOURCE was not made from the index LINK holds now, whose "
        "changes since (removals, additions, a recalibration) it then undoes: a rollback",
    )
    publish.set_defaults(handler=cmd_index_publish)
