"""Two commands editing one index must not undo each other's change.

`calibrate --save`, `index add`, `index remove` and `index publish` each read the index,
work (seconds to hours), then publish a copy of what they read: an opt-out added, or a
person erased, in between was silently undone, with exit 0 and no trace in the history."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import filter.index_release as release_module
from filter.index import FaissIdentityIndex
from filter.index_edit import remove_identities
from filter.index_release import (
    IndexBusyError,
    IndexChangedError,
    editing,
    fingerprint_at,
    flip_link,
    publish,
    publish_folder,
)
from tests.commands import facegate
from tests.unit.test_index_atomic import small_index


def _linked(tmp_path: Path, seed: int = 1) -> tuple[Path, Path]:
    release = tmp_path / "releases" / "r1"
    small_index(seed).save(release)
    link = tmp_path / "current"
    flip_link(link, release)
    return link, release


def test_a_saved_index_is_recognised_by_its_manifest_alone(tmp_path: Path) -> None:
    """The change check reads only manifest.json: it must name the loaded index."""
    link, release = _linked(tmp_path)
    loaded = FaissIdentityIndex.load(link)
    assert fingerprint_at(link) == fingerprint_at(release) == loaded.fingerprint
    assert fingerprint_at(tmp_path / "nothing") is None


def test_a_second_editor_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    link, _ = _linked(tmp_path)
    otherwise = tmp_path / "releases" / ".." / "current"  # the same index, named otherwise
    busy = rf"writing {tmp_path}/releases/\.\./current \(pid {os.getpid()} since"
    with editing(link), pytest.raises(IndexBusyError, match=busy), editing(otherwise):
        pass
    with editing(link):  # released on exit
        pass


def test_a_result_made_from_an_index_since_replaced_is_not_published(tmp_path: Path) -> None:
    """remove reads r1; meanwhile an `index add` publishes r2; remove's result (r1 minus
    one person) would drop r2's new identities."""
    link, _ = _linked(tmp_path)
    read = FaissIdentityIndex.load(link)
    edited, _report = remove_identities(read, ["person-1-0"], None)
    meanwhile = tmp_path / "releases" / "r2"
    small_index(2).save(meanwhile)
    flip_link(link, meanwhile)
    with pytest.raises(IndexChangedError, match="changed while this command worked"):
        publish(edited, link, read=read.fingerprint)
    assert os.path.realpath(link) == str(meanwhile)
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["r1", "r2"]
    again = FaissIdentityIndex.load(link)  # the rerun the message asks for
    edited_again, _report = remove_identities(again, ["person-2-0"], None)
    written = publish(edited_again, link, read=again.fingerprint)
    assert os.path.realpath(link) == str(written) and written.parent.name == "releases"


def test_an_unchanged_index_is_published_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    small_index(1).save(folder)
    read = FaissIdentityIndex.load(folder)
    edited, _report = remove_identities(read, ["person-1-0"], None)
    assert publish(edited, folder, read=read.fingerprint) == folder
    assert fingerprint_at(folder) == edited.fingerprint


def test_publish_flips_only_the_link_it_compared_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The looser-than-live check was made against the link's target before the copy:
    a flip in between made it check one index and replace another."""
    link, _ = _linked(tmp_path)
    source = tmp_path / "built"
    small_index(3).save(source)
    copy = release_module._copy_verified

    def copy_then_someone_flips(*args: object) -> None:
        copy(*args)  # type: ignore[arg-type]
        other = tmp_path / "releases" / "by-hand"
        small_index(4).save(other)
        flip_link(link, other)

    monkeypatch.setattr(release_module, "_copy_verified", copy_then_someone_flips)
    with pytest.raises(IndexChangedError):
        publish_folder(source, link)
    assert os.path.realpath(link) == str(tmp_path / "releases" / "by-hand")


def test_index_remove_is_refused_while_another_command_edits_the_index(
    tmp_path: Path,
) -> None:
    link, release = _linked(tmp_path)
    with editing(link):
        result = facegate("index", "remove", str(link), "--identity", "person-1-0")
    assert result.returncode == 2, result.stderr
    assert "another facegate command is writing" in result.stderr
    assert os.path.realpath(link) == str(release)
    result = facegate("index", "remove", str(link), "--identity", "person-1-0")
    assert result.returncode == 0, result.stderr
    assert os.path.realpath(link) != str(release)


def test_publishing_a_copy_made_before_an_erasure_does_not_bring_the_person_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented workflow: `index add CURRENT optouts --out NEW`, calibrate NEW (hours),
    `index publish NEW CURRENT`. An `index remove CURRENT` in between was undone."""
    import filter.index_lineage

    # Both edits in one second, without a key: their records are equal dicts (CI).
    monkeypatch.setattr(filter.index_lineage.time, "strftime", lambda *_: "2026-12-06T03:00:00Z")
    link, _ = _linked(tmp_path)
    new = tmp_path / "new"
    made = facegate("index", "remove", str(link), "--identity", "person-1-0", "--out", str(new))
    assert made.returncode == 0, made.stderr
    erased = facegate("index", "remove", str(link), "--identity", "person-1-5")
    assert erased.returncode == 0, erased.stderr
    live = os.path.realpath(link)
    refused = facegate("index", "publish", str(new), str(link))
    assert refused.returncode == 2
    assert "1 removal(s), whose identities would be back" in refused.stderr
    assert "--discard-live-changes" in refused.stderr and os.path.realpath(link) == live
    assert "person-1-5" not in FaissIdentityIndex.load(link).faces.identities
    # Made again from the live index, it publishes; so does a knowing rollback.
    again = tmp_path / "again"
    assert (
        facegate(
            "index", "remove", str(link), "--identity", "person-1-0", "--out", str(again)
        ).returncode
        == 0
    )
    assert facegate("index", "publish", str(again), str(link)).returncode == 0
    rollback = facegate("index", "publish", str(new), str(link), "--discard-live-changes")
    assert rollback.returncode == 0, rollback.stderr
    assert "this release undoes 2 edit(s)" in rollback.stderr


def test_a_rollback_counts_only_the_edits_made_since_the_release(tmp_path: Path) -> None:
    """Back to P = remove(L0) from remove(P): the warning counted P's own edit as undone."""
    link, _ = _linked(tmp_path)
    assert facegate("index", "remove", str(link), "--identity", "person-1-0").returncode == 0
    previous = os.path.realpath(link)
    assert facegate("index", "remove", str(link), "--identity", "person-1-5").returncode == 0
    refused = facegate("index", "publish", previous, str(link))
    assert refused.returncode == 2
    said = " ".join(refused.stderr.split())
    assert (
        "undo 1 edit(s) made to the live index since the one this index was made from: "
        "1 removal(s)" in said
    )


def test_a_hand_flip_while_the_result_is_written_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change check ran before the release was written, then the link flipped."""
    link, _ = _linked(tmp_path)
    read = FaissIdentityIndex.load(link)
    edited, _report = remove_identities(read, ["person-1-0"], None)
    save = FaissIdentityIndex.save
    by_hand = tmp_path / "releases" / "by-hand"
    small_index(5).save(by_hand)

    def save_then_someone_flips(index: FaissIdentityIndex, folder: Path) -> None:
        save(index, folder)
        flip_link(link, by_hand)

    monkeypatch.setattr(FaissIdentityIndex, "save", save_then_someone_flips)
    with pytest.raises(IndexChangedError):
        publish(edited, link, read=read.fingerprint)
    assert os.path.realpath(link) == str(by_hand)
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["by-hand", "r1"]


def test_an_edit_to_a_folder_not_made_yet_takes_its_lock_there(tmp_path: Path) -> None:
    link, _ = _linked(tmp_path)
    out = tmp_path / "a" / "b" / "idx"
    result = facegate("index", "remove", str(link), "--identity", "person-1-0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert FaissIdentityIndex.load(out).identity_count == 11
