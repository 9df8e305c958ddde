"""Where passed copies go, and the inputs that would fight over one place (in one run, or
against the copies an earlier run into the same OUT recorded). Light imports only: the
record step (every Ray worker) imports `sniff_suffix` from here."""

from __future__ import annotations

import secrets
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from batch.errors import BatchInputError

PASS_PREFIX = "pass/"  # batch.manifest.PASS_DIR as the manifest's pass_copy spells it

_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)
WEBP_SUFFIX = ".webp"
UNKNOWN_SUFFIX = ".img"
# Every suffix `sniff_suffix` can give: a copy whose name has none gets one of these at
# record time, once its bytes are known, so each is reserved for it before the run.
SNIFFED_SUFFIXES = tuple(dict.fromkeys([*(s for _, s in _MAGIC), WEBP_SUFFIX, UNKNOWN_SUFFIX]))


class Target(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def copy_to(self) -> str: ...


def sniff_suffix(data: bytes) -> str:
    """A file suffix for image bytes that came without a name (Parquet rows)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP_SUFFIX
    return next((suffix for magic, suffix in _MAGIC if data.startswith(magic)), UNKNOWN_SUFFIX)


def possible_copies(copy_to: str) -> tuple[str, ...]:
    """Every path under OUT/pass/ the copy of `copy_to` may take."""
    if PurePosixPath(copy_to).suffix:
        return (copy_to,)
    return tuple(copy_to + suffix for suffix in SNIFFED_SUFFIXES)


def _folders(path: str) -> Iterable[str]:
    parts = PurePosixPath(path).parts
    return ("/".join(parts[:n]) for n in range(1, len(parts)))


NameFolding = Callable[[str], str]


def same_name(name: str) -> str:
    return name


def name_folding(folder: Path) -> NameFolding:
    """How the file system holding `folder` compares file names, as a function that maps
    names it takes for one file to one string: case-insensitive (macOS, Windows) and
    Unicode-form-insensitive (macOS) systems would put two copies whose paths differ
    only so in one file. Probed with two empty files, removed at once; a folder that
    cannot be probed is taken as folding both."""
    probe = folder / f".facegate-names-{secrets.token_hex(6)}"
    try:
        fold_case = _same_file(probe, "a", "A")
        fold_form = _same_file(probe, "e\u0301", "\u00e9")  # decomposed, composed
    except OSError:
        fold_case = fold_form = True

    def fold(name: str) -> str:
        if fold_form:
            name = unicodedata.normalize("NFC", name)
        return unicodedata.normalize("NFC", name.casefold()) if fold_case else name

    return fold if fold_case or fold_form else same_name


def _same_file(probe: Path, written: str, looked_up: str) -> bool:
    made = probe.with_name(probe.name + "-" + written)
    made.touch(exist_ok=False)
    try:
        return probe.with_name(probe.name + "-" + looked_up).exists()
    finally:
        made.unlink()


class CopyPlaces:
    """The copy paths taken so far, and the folders they need: a copy cannot go where
    another copy is, nor where another copy needs a folder, nor below another copy; paths
    are compared as OUT's file system compares them (`fold`)."""

    def __init__(self, fold: NameFolding = same_name) -> None:
        self._fold = fold
        self._files: dict[str, str] = {}  # folded copy path -> the key of the input it holds
        self._folders: dict[str, str] = {}

    def taken_by(self, key: str, copy_to: str) -> tuple[str, str] | None:
        """(another input's key, the contested path), or None when `key` may copy there."""
        for path in possible_copies(copy_to):
            for place in (path, *_folders(path)):
                owner = self._files.get(self._fold(place))
                if owner is not None and owner != key:
                    return owner, place
            owner = self._folders.get(self._fold(path))
            if owner is not None and owner != key:
                return owner, path
        return None

    def take(self, key: str, copy_to: str) -> None:
        for path in possible_copies(copy_to):
            self._files.setdefault(self._fold(path), key)
            for folder in _folders(path):
                self._folders.setdefault(self._fold(folder), key)


def refuse_taken_places(items: Iterable[Target], fold: NameFolding = same_name) -> None:
    """Two inputs of one run whose copies would land on one path (or one where the other
    needs a folder) are refused before anything is read."""
    places = CopyPlaces(fold)
    for item in items:
        taken = places.taken_by(item.key, item.copy_to)
        if taken is not None:
            other, place = taken
            raise BatchInputError(
                f"{other} and {item.key} would both be copied to pass/{place}; give inputs "
                "whose folders have different names, or rename one (copies are PNGs, so "
                "files that differ only by their suffix collide too unless --copy-original; "
                "a name without a suffix takes the suffix of its bytes; where OUT's file "
                "system ignores case or Unicode form, names that differ only so collide)"
            )
        places.take(item.key, item.copy_to)


def refuse_recorded_places(
    items: Iterable[Target],
    current: Mapping[str, Mapping[str, Any]],
    out: object,
    fold: NameFolding = same_name,
) -> None:
    """An input whose copy would land where OUT already holds another input's recorded
    copy (an earlier run from another folder of the same name) is refused: the copy would
    replace it, and a later change to either would remove the other's."""
    recorded = CopyPlaces(fold)
    for key, row in current.items():
        copy = row.get("pass_copy")
        if copy and str(copy).startswith(PASS_PREFIX):
            recorded.take(key, str(copy)[len(PASS_PREFIX) :])
    for item in items:
        taken = recorded.taken_by(item.key, item.copy_to)
        if taken is not None:
            other, place = taken
            raise BatchInputError(
                f"{item.key} would be copied to pass/{place}, where {out} already holds the "
                f"copy of {other} (an earlier run): give inputs whose folders have "
                "different names, or write to a new --out"
            )
