"""The index folder on disk: manifest, file hashes, labels, calibration, and atomic
writes (a staging folder renamed over the target, so a reader never sees half an index)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import faiss

from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.models import sha256_file
from filter.replica import PROJECTION_FILE
from filter.vector_table import VectorTable

FORMAT_VERSION = 2
# Format 1 had no replica features, no self-test guarantees and no saved calibration.
VECTORS_FILE = "vectors.faiss"
LABELS_FILE = "labels.json"
REPLICAS_FILE = "replicas.faiss"
REPLICA_LABELS_FILE = "replica_labels.json"
CALIBRATION_FILE = "calibration.json"
MANIFEST_FILE = "manifest.json"

# Detector settings that change what an embedding means; an index built with other values
# is refused. The minimum face fraction is search scope, not meaning (the generated-output
# fast path searches a subset of the full path's pyramid by design), so it may differ.
DETECTOR_KEYS_EXCLUDED_FROM_MATCH = frozenset({"min_face_fraction"})


def labels_of(table: VectorTable) -> list[dict[str, str]]:
    return [
        {"identity": i, "source": s} for i, s in zip(table.identities, table.sources, strict=True)
    ]


def read_manifest(folder: Path) -> dict[str, Any]:
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise IdentityIndexError(
            f"identity index {folder} does not exist; build one with "
            "`facegate index build GALLERY --out INDEX`"
        )
    if not manifest_path.is_file():
        raise IndexCorruptError(f"identity index {folder} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise TypeError("the manifest is not a JSON object")
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["embedder"], dict):
            raise TypeError("files and embedder must be objects")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{manifest_path} is not a valid manifest: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexMismatchError(
            f"{folder} has index format {version}, this facegate reads format "
            f"{FORMAT_VERSION} (which adds replica features, a load self-test and a saved "
            "calibration); rebuild it with `facegate index build GALLERY --out "
            f"{folder}` (`make run` rebuilds its demo index by itself)"
        )
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    files = manifest["files"]
    required = [VECTORS_FILE, LABELS_FILE]
    if manifest.get("replica") is not None:
        required += [REPLICAS_FILE, REPLICA_LABELS_FILE, PROJECTION_FILE]
    for name in required:
        if name not in files:
            raise IndexCorruptError(f"{folder}/{MANIFEST_FILE} lists no {name}")
    for name, expected in files.items():
        if name not in (*required, CALIBRATION_FILE) or not isinstance(expected, dict):
            raise IndexCorruptError(f"{folder}/{MANIFEST_FILE} lists an unknown file {name!r}")
        path = folder / name
        if not path.is_file():
            raise IndexCorruptError(f"identity index {folder} is missing {name}")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise IndexCorruptError(
                f"{path} is {size} bytes, the manifest says {expected.get('bytes')}: "
                "truncated or replaced; rebuild the index"
            )
        if sha256_file(path) != expected.get("sha256"):
            raise IndexCorruptError(
                f"{path} does not match the sha256 in the manifest; rebuild the index"
            )


def check_detector(folder: Path, built: object, running: dict[str, object]) -> None:
    if not isinstance(built, dict):
        raise IndexMismatchError(f"index {folder} records no detector settings; rebuild it")
    if (built.get("detector"), built.get("detector_version")) != (
        running.get("detector"),
        running.get("detector_version"),
    ):
        raise IndexMismatchError(_other_detector_message(folder, built, running))
    differing = _differing_settings(built, running)
    if differing:
        shown = ", ".join(
            f"{k}: index {built.get(k)!r} vs running {running.get(k)!r}" for k in differing
        )
        raise IndexMismatchError(
            f"index {folder} was built with other detector settings ({shown}); its "
            "embeddings would not mean what the running filter's do. Rebuild the index "
            f"with the running detector (`facegate index build GALLERY --out NEW`), then "
            "calibrate the new index (`facegate calibrate --index NEW ... --save`)"
        )


def _differing_settings(built: dict[str, Any], running: dict[str, Any]) -> list[str]:
    keys = (set(built) | set(running)) - DETECTOR_KEYS_EXCLUDED_FROM_MATCH
    keys -= {"detector", "detector_version"}
    return sorted(k for k in keys if _normalised(built.get(k)) != _normalised(running.get(k)))


def _other_detector_message(folder: Path, built: dict[str, Any], running: dict[str, Any]) -> str:
    from filter.faces import DETECTOR_IDENTITIES, detector_choice

    def named(settings: dict[str, Any]) -> str:
        version = settings.get("detector_version")
        return f"{settings.get('detector')!r}" + (f" version {version}" if version else "")

    # Offer the detector that built it only where this facegate still has it as it was:
    # the same implementation and version, and the same settings.
    choice = detector_choice(built.get("detector"))
    keep = ""
    if choice is not None:
        identity = DETECTOR_IDENTITIES[choice]
        same_version = identity.get("detector_version") == built.get("detector_version")
        if same_version and not _differing_settings(built, running):
            keep = (
                f", or run with the detector that built it (FACEGATE_DETECTOR={choice}, or "
                f"--detector {choice})"
            )
    return (
        f"index {folder} was built with detector {named(built)}, the running detector is "
        f"{named(running)}: their faces and embeddings differ. Rebuild the index with the "
        f"running detector (`facegate index build GALLERY --out NEW`, then calibrate it: "
        f"`facegate calibrate --index NEW ... --save`; `make run` rebuilds its demo index "
        f"by itself){keep}"
    )


def _normalised(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def read_table(folder: Path, name: str, vectors_file: str, labels_file: str) -> VectorTable:
    try:
        index = faiss.read_index(str(folder / vectors_file))
    except RuntimeError as exc:
        raise IndexCorruptError(f"cannot read {folder / vectors_file}: {exc}") from None
    try:
        labels = json.loads((folder / labels_file).read_text())
        identities = [str(row["identity"]) for row in labels]
        sources = [str(row["source"]) for row in labels]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{folder / labels_file} is not valid: {exc}") from None
    return VectorTable(name, index, identities, sources)


def read_calibration(folder: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    if CALIBRATION_FILE not in manifest["files"]:
        return None
    path = folder / CALIBRATION_FILE
    try:
        calibration = json.loads(path.read_text())
        for key in ("threshold", "replica_threshold"):
            value = calibration.get(key)
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and -1 <= value <= 1
            ):
                raise ValueError(f"{key} {value!r} is not a similarity in [-1, 1]")
        if not isinstance(calibration.get("threshold"), (int, float)):
            raise ValueError("no threshold")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{path} is not a valid calibration: {exc}") from None
    return dict(calibration)


def write_json(path: Path, payload: object) -> None:
    with path.open("w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`; a reader sees the old or the new folder, whole."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
