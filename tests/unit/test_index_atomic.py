"""Issue 19, point 6: a reader never sees a missing, half-written or mixed index.

On main, `swap_in` renamed the old folder away before renaming the new one in (a moment
with no folder), a load could verify one manifest and read another version's files, and
a file vanishing mid-load escaped as a FileNotFoundError traceback."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import filter.index as index_module
import filter.index_store as store
from filter.errors import IdentityIndexError
from filter.index import FaissIdentityIndex
from tests.commands import facegate

DETECTOR = {"detector": "test", "detector_version": "1"}


def small_index(seed: int, count: int = 12) -> FaissIdentityIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    identities = [f"person-{seed}-{i}" for i in range(count)]
    return FaissIdentityIndex.build(
        vectors,
        identities,
        [f"{i}.jpg" for i in identities],
        embedder_name="test",
        model_sha256="0" * 64,
        detector=DETECTOR,
    )


def test_replacing_a_folder_never_leaves_the_path_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "index"
    small_index(1).save(target)
    seen: list[bool] = []
    real_replace, real_exchange = store.os.replace, getattr(store, "exchange", None)

    def replace(a: object, b: object) -> None:
        real_replace(a, b)  # type: ignore[arg-type]
        seen.append((target / "manifest.json").is_file())

    def exchange(a: Path, b: Path) -> None:
        assert real_exchange is not None
        real_exchange(a, b)
        seen.append((target / "manifest.json").is_file())

    monkeypatch.setattr(store.os, "replace", replace)
    monkeypatch.setattr(store, "exchange", exchange, raising=False)
    second = small_index(2)
    second.save(target)
    assert seen and all(seen), seen  # after every step, an index is at the path
    assert FaissIdentityIndex.load(target).fingerprint == second.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # nothing left beside it


def test_concurrent_readers_see_one_whole_version(tmp_path: Path) -> None:
    target = tmp_path / "index"
    versions = [small_index(seed) for seed in range(3)]
    for number, version in enumerate(versions):
        version.save(tmp_path / f"v{number}")  # its manifest now lists its files
    versions[0].save(target)
    fingerprints = {v.fingerprint for v in versions}
    stop = threading.Event()
    problems: list[str] = []
    loads = 0

    def read() -> None:
        nonlocal loads
        while not stop.is_set():
            try:
                found = FaissIdentityIndex.load(target).fingerprint
            except IdentityIndexError as exc:
                problems.append(str(exc))
                continue
            loads += 1
            if found not in fingerprints:
                problems.append(f"unknown version {found}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(15):
            versions[round_ % 3].save(target)
    finally:
        stop.set()
        reader.join(30)
    assert loads > 0 and problems == []


def test_a_load_reads_the_version_it_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is replaced right after the manifest and hashes were checked: the load
    still returns the verified version, whole (on main: that manifest with the other
    version's files)."""
    target = tmp_path / "index"
    first, second = small_index(1), small_index(2)
    first.save(target)
    real_verify = index_module.verify_files

    def verify_then_swap(*args: object) -> None:
        real_verify(*args)  # type: ignore[arg-type]
        second.save(target)

    monkeypatch.setattr(index_module, "verify_files", verify_then_swap)
    loaded = FaissIdentityIndex.load(target)
    assert loaded.fingerprint == first.fingerprint
    assert np.array_equal(loaded.vectors(), first.vectors())
    assert loaded.faces.identities == first.faces.identities


def test_a_folder_swapped_and_removed_mid_read_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader opened the old folder and read its manifest; then a writer exchanged a
    new version in and removed the old files before the reader opened them. The reader
    reads the path again and gets the new version, whole (not an error, not a mix)."""
    target = tmp_path / "index"
    first, second = small_index(1), small_index(2)
    first.save(target)
    second.save(tmp_path / "second")  # its manifest now lists its files
    real_verify = index_module.verify_files
    calls: list[int] = []

    def swap_first(*args: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            second.save(target)  # exchange, then the old folder's files are removed
        real_verify(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(index_module, "verify_files", swap_first)
    loaded = FaissIdentityIndex.load(target)
    assert len(calls) == 2  # read again
    assert loaded.fingerprint == second.fingerprint
    assert np.array_equal(loaded.vectors(), second.vectors())


@pytest.mark.parametrize("when", ["after verification", "before it is opened"])
def test_a_file_that_vanishes_mid_load_is_a_clean_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    target = tmp_path / "index"
    index = small_index(1)
    index.save(target)
    real_verify = index_module.verify_files

    def vanish(*args: object) -> None:
        if when == "before it is opened":
            (target / "labels.json").unlink()
        real_verify(*args)  # type: ignore[arg-type]
        if when == "after verification":
            (target / "labels.json").unlink(missing_ok=True)

    monkeypatch.setattr(index_module, "verify_files", vanish)
    result = facegate("index", "info", str(target))
    assert "Traceback" not in result.stderr, result.stderr
    if when == "after verification":  # the verified file, still open, is what is read
        assert result.returncode == 0 and json.loads(result.stdout)["fingerprint"] == (
            index.fingerprint
        )
    else:
        assert result.returncode == 2 and "labels.json" in result.stderr


def test_a_folder_that_cannot_be_exchanged_is_refused_naming_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "index"
    first = small_index(1)
    first.save(target)

    def unsupported(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(store, "exchange", unsupported)
    with pytest.raises(store.IndexLayoutError, match="symlink"):
        small_index(2).save(target)
    assert FaissIdentityIndex.load(target).fingerprint == first.fingerprint  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no staging left


def test_saving_onto_a_symlink_is_refused(tmp_path: Path) -> None:
    """A link is flipped to a new release (index_release.publish), never replaced by a
    folder (on main `calibrate --save` turned the documented link into a plain folder)."""
    release = tmp_path / "releases" / "v1"
    small_index(1).save(release)
    link = tmp_path / "current"
    link.symlink_to(release)
    with pytest.raises(store.IndexLayoutError, match="symlink"):
        small_index(2).save(link)
    assert link.is_symlink()


def test_an_index_is_written_only_over_nothing_an_empty_folder_or_an_index(
    tmp_path: Path,
) -> None:
    """An `--out` naming the wrong folder must not delete what it holds (review finding:
    `index build --out` swapped its folder in and removed a folder of other files)."""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"somebody's file")
    with pytest.raises(store.IndexLayoutError, match="not an identity index"):
        small_index(1).save(other)
    assert (other / "keep.jpg").read_bytes() == b"somebody's file"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(store.IndexLayoutError, match="is a file"):
        small_index(1).save(a_file)
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]  # no staging
    empty = tmp_path / "empty"
    empty.mkdir()
    small_index(1).save(empty)
    second = small_index(2)
    second.save(empty)  # an index is replaced by an index
    assert FaissIdentityIndex.load(empty).fingerprint == second.fingerprint
    # The CLI refuses before any enrolment, with the same words and nothing else.
    result = facegate("index", "build", str(tmp_path / "gallery"), "--out", str(other))
    assert result.returncode == 2 and "not an identity index" in result.stderr
    assert "Traceback" not in result.stderr
