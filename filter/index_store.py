"""The index folder on disk: manifest, file hashes, labels, calibration, and atomic
reads and writes.

Reads go through an `IndexSnapshot`: the folder is opened once (a directory descriptor)
and every file is opened relative to it, hashed, and parsed from that same open file. A
folder swapped while it is read stays, for this reader, the folder it opened; if the
writer removes it before the reader has opened every file, the reader reads the new
folder from the start (`FaissIdentityIndex.load`). A file that vanishes from a folder
nobody swapped is a clean IndexCorruptError (exit 2), never a traceback.

Writes go to a staging folder, then replace the target in one step: a rename onto a new
path, or an atomic exchange (renameat2 RENAME_EXCHANGE) with an existing folder, so a
reader never finds the path missing. Where the filesystem cannot exchange, the write is
refused and the message names the layout that can (a symlink: `facegate index publish`)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import faiss

from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.faiss_layout import FLAT_PREFIX_BYTES, check_flat_layout
from filter.replica import PROJECTION_FILE
from filter.vector_table import VectorTable

FORMAT_VERSION = 3
# What each format changed; an older index is refused with the changes it lacks and the
# command that rebuilds it. Format 2's replica feature was blind to mirrored, cropped and
# shifted copies; format 3's is searched through views that undo them (filter/replica.py),
# still one row of 64 numbers per training image.
FORMAT_CHANGES = {
    2: "adds replica features, a load self-test and a saved calibration",
    3: "changes the replica feature so that mirrored, cropped and shifted copies of a "
    "training image are caught",
}
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


class IndexSnapshot:
    """One consistent view of an index folder (see the module's docstring). Files are
    opened once each and stay open until `close`, so what was hashed is what is parsed."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise IdentityIndexError(
                f"identity index {folder} does not exist; build one with "
                "`facegate index build GALLERY --out INDEX`"
            ) from None
        except NotADirectoryError:
            raise IdentityIndexError(
                f"identity index {folder} is a file, not an index folder (what "
                "`facegate index build GALLERY --out INDEX` writes)"
            ) from None
        except OSError as exc:
            raise IdentityIndexError(f"cannot open identity index {folder}: {exc}") from None
        self._files: dict[str, BinaryIO] = {}

    def replaced(self) -> bool:
        """Whether the path now names another folder than the one this snapshot opened
        (it was swapped while being read: read it again)."""
        try:
            return os.stat(self.folder).st_ino != os.fstat(self._fd).st_ino
        except OSError:
            return False

    def open(self, name: str) -> BinaryIO:
        """The file `name` of this folder, at its start (opened once)."""
        handle = self._files.get(name)
        if handle is None:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=self._fd)
            except FileNotFoundError:
                raise IndexCorruptError(
                    f"identity index {self.folder} is missing {name} (or it vanished while "
                    "being read: a folder replaced in place; retry, or publish through a "
                    "symlink)"
                ) from None
            except OSError as exc:
                raise IndexCorruptError(f"cannot read {self.folder / name}: {exc}") from None
            handle = os.fdopen(fd, "rb")
            self._files[name] = handle
        handle.seek(0)
        return handle

    def read(self, name: str) -> bytes:
        return self.open(name).read()

    def size(self, name: str) -> int:
        return os.fstat(self.open(name).fileno()).st_size

    def sha256(self, name: str) -> str:
        handle = self.open(name)
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        os.close(self._fd)

    def __enter__(self) -> IndexSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(snapshot: IndexSnapshot) -> dict[str, Any]:
    folder = snapshot.folder
    manifest_path = folder / MANIFEST_FILE
    try:
        text = snapshot.read(MANIFEST_FILE)
    except IndexCorruptError:
        raise IndexCorruptError(f"identity index {folder} has no {MANIFEST_FILE}") from None
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict):
            raise TypeError("the manifest is not a JSON object")
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["embedder"], dict):
            raise TypeError("files and embedder must be objects")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{manifest_path} is not a valid manifest: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        changes = "; ".join(
            f"format {v} {text}"
            for v, text in FORMAT_CHANGES.items()
            if not isinstance(version, int) or v > version
        )
        raise IndexMismatchError(
            f"{folder} has index format {version}, this facegate reads format "
            f"{FORMAT_VERSION} ({changes}); rebuild it with `facegate index build GALLERY "
            f"--out {folder}` (`make run` rebuilds its demo index by itself)"
        )
    return manifest


def verify_files(snapshot: IndexSnapshot, manifest: dict[str, Any]) -> None:
    folder = snapshot.folder
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
        size = snapshot.size(name)
        if size != expected.get("bytes"):
            raise IndexCorruptError(
                f"{path} is {size} bytes, the manifest says {expected.get('bytes')}: "
                "truncated or replaced; rebuild the index"
            )
        if snapshot.sha256(name) != expected.get("sha256"):
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


def read_table(
    snapshot: IndexSnapshot, name: str, vectors_file: str, labels_file: str
) -> VectorTable:
    folder = snapshot.folder
    prefix = snapshot.open(vectors_file).read(FLAT_PREFIX_BYTES)
    check_flat_layout(prefix, snapshot.size(vectors_file), folder / vectors_file)
    try:
        # From the file that was hashed, not from the path (which may name another by now).
        reader = faiss.PyCallbackIOReader(snapshot.open(vectors_file).read)  # type: ignore[attr-defined]
        index = faiss.read_index(reader)
    except RuntimeError as exc:
        raise IndexCorruptError(f"cannot read {folder / vectors_file}: {exc}") from None
    except MemoryError:
        raise IndexCorruptError(
            f"cannot read {folder / vectors_file}: it claims an array larger than this "
            "machine's memory (a corrupt file)"
        ) from None
    try:
        labels = json.loads(snapshot.read(labels_file))
        identities = [str(row["identity"]) for row in labels]
        sources = [str(row["source"]) for row in labels]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{folder / labels_file} is not valid: {exc}") from None
    return VectorTable(name, index, identities, sources)


def read_calibration(snapshot: IndexSnapshot, manifest: dict[str, Any]) -> dict[str, Any] | None:
    if CALIBRATION_FILE not in manifest["files"]:
        return None
    path = snapshot.folder / CALIBRATION_FILE
    try:
        calibration = json.loads(snapshot.read(CALIBRATION_FILE))
        for key in ("threshold", "replica_threshold"):
            value = calibration.get(key)
            # JSON true is an int to Python: as a threshold it would read as 1.0 (off).
            if value is not None and not (
                _is_number(value) and math.isfinite(value) and -1 <= value <= 1
            ):
                raise ValueError(f"{key} {value!r} is not a similarity in [-1, 1]")
        if not _is_number(calibration.get("threshold")):
            raise ValueError("no threshold")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise IndexCorruptError(f"{path} is not a valid calibration: {exc}") from None
    return dict(calibration)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


class IndexLayoutError(IdentityIndexError):
    """The index cannot be replaced atomically where it is."""


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(first: Path, second: Path) -> None:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE): no moment without either.
    OSError (ENOSYS, EINVAL, ENOTSUP...) where the kernel or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        renameat2 = libc.renameat2
    except AttributeError:
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if (
        renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        != 0
    ):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def check_replaceable(target: Path) -> None:
    """Refuse to write an index over anything but nothing, an empty folder or an index:
    an `--out` naming the wrong folder must not delete what it holds."""
    if target.is_symlink() or not target.exists():
        return
    if not target.is_dir():
        raise IndexLayoutError(f"{target} is a file, not an index folder; choose another path")
    if (target / MANIFEST_FILE).is_file() or not any(target.iterdir()):
        return
    raise IndexLayoutError(
        f"{target} holds files and is not an identity index (no {MANIFEST_FILE}); "
        "refusing to replace it: choose a new path, or remove it yourself"
    )


def swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`; a reader sees the old folder or the new one, whole,
    and the path never goes missing (see the module's docstring)."""
    if target.is_symlink():
        raise IndexLayoutError(
            f"{target} is a symlink: write a new release and flip it "
            "(filter.index_release.publish), not the link itself"
        )
    check_replaceable(target)
    if not target.exists():
        os.replace(staging, target)
        return
    try:
        exchange(staging, target)
    except OSError as exc:
        raise IndexLayoutError(
            f"cannot replace the folder {target} atomically here ({exc.strerror or exc}): "
            "readers could see it missing. Use the symlink layout: move it into "
            f"{target.parent}/releases/, link {target} to it, and edit or publish through "
            "the link (`facegate index publish`, docs/operations.md)"
        ) from None
    shutil.rmtree(staging, ignore_errors=True)  # the old folder, now at the staging name
