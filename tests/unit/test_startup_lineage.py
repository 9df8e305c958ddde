"""A restart applies the edit-history rule too (`service.reload_guard.startup_refusal`):
a link flipped by hand to an older release, then a restart, would serve an erased identity
again (or release an opted-out one) on every pod that restarts. Every facegate command
that flips a link records the release it put there (`filter.release_record`); a server
starts only where what the link names does not undo that release's identity edits.
End to end (the server exits 2): tests/loopback/test_startup_lineage.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from filter.index import FaissIdentityIndex
from filter.index_release import flip_link
from filter.release_record import ReleaseRecordError, last_published, record_path
from service.errors import StartupError
from service.reload import LiveFilter
from service.reload_guard import start_live, startup_refusal
from tests.commands import facegate
from tests.unit.test_index_atomic import small_index
from tests.unit.test_reload import Named, Thresholds


def _loaded(path: Path) -> LiveFilter:
    index = FaissIdentityIndex.load(path)
    return LiveFilter(Named(index.fingerprint), index, Thresholds(), None, path, None)  # type: ignore[arg-type]


def _refusal(link: Path) -> str | None:
    return startup_refusal(_loaded(link), last_published(link))


def _releases(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A link to r1 (put there by hand: no record), then `index remove` through the link:
    (link, r1, the edited release facegate published and recorded)."""
    first = tmp_path / "releases" / "r1"
    small_index(1).save(first)
    link = tmp_path / "current"
    flip_link(link, first)
    assert last_published(link) is None
    removed = facegate("index", "remove", str(link), "--identity", "person-1-0")
    assert removed.returncode == 0, removed.stderr
    return link, first, Path(os.path.realpath(link))


def test_a_restart_after_a_hand_flip_that_undoes_an_edit_is_refused(tmp_path: Path) -> None:
    link, first, edited = _releases(tmp_path)
    published = last_published(link)
    assert published is not None
    assert published.fingerprint == _loaded(edited).fingerprint
    assert published.release.resolve() == edited
    assert _refusal(link) is None  # what facegate put there

    flip_link(link, first)  # by hand: the removed person would be back
    refusal = _refusal(link)
    assert refusal is not None
    assert "1 removal(s), whose identities would be back" in refusal
    assert str(published.release) in refusal and "--discard-live-changes" in refusal
    # The same index through a folder path, or a link with no record: nothing to compare.
    assert startup_refusal(_loaded(first), None) is None
    record_path(link).unlink()
    assert _refusal(link) is None


def test_a_published_rollback_starts_and_so_does_a_hand_flip_forward(tmp_path: Path) -> None:
    link, first, edited = _releases(tmp_path)
    rollback = facegate("index", "publish", str(first), str(link), "--discard-live-changes")
    assert rollback.returncode == 0, rollback.stderr
    copy = Path(os.path.realpath(link))
    recorded = last_published(link)
    assert recorded is not None and recorded.release.resolve() == copy
    assert _refusal(link) is None
    # Forward again by hand, to the index made from r1 (what the rollback copies): it undoes
    # nothing of the rollback, so it starts.
    flip_link(link, edited)
    assert _refusal(link) is None
    # A hand flip to the rollback again, after facegate published a new edit on it, undoes
    # that edit: its record was given against another index, so it covers nothing here.
    flip_link(link, copy)
    removed = facegate("index", "remove", str(link), "--identity", "person-1-1")
    assert removed.returncode == 0, removed.stderr
    flip_link(link, copy)
    refusal = _refusal(link)
    assert refusal is not None and "1 removal(s)" in refusal


def test_the_record_judges_without_the_release_folder_and_an_unreadable_one_stops_startup(
    tmp_path: Path,
) -> None:
    """The record keeps the recorded release's lineage: a hand flip is refused even where
    that release's folder is gone (pruned while a server starts, say). A record that
    cannot be read stops startup and says how to go on."""
    link, first, edited = _releases(tmp_path)
    flip_link(link, first)
    shutil.rmtree(edited)
    refusal = _refusal(link)
    assert refusal is not None and "1 removal(s)" in refusal
    record = record_path(link)
    record.write_text("{not json")
    with pytest.raises(ReleaseRecordError, match="cannot be read") as info:
        _refusal(link)
    assert str(record) in str(info.value) and f"remove {record}" in str(info.value)


def test_nothing_is_published_over_a_hand_flip_that_undoes_an_edit(tmp_path: Path) -> None:
    """An edit or a publish over the hand flip would record it as published, and servers
    would then start on what it undid: both are refused until the link is pointed back."""
    link, first, edited = _releases(tmp_path)
    flip_link(link, first)  # by hand
    record = record_path(link).read_bytes()
    edit = facegate("index", "remove", str(link), "--identity", "person-1-1")
    rollback = facegate("index", "publish", str(first), str(link), "--discard-live-changes")
    for refused in (edit, rollback):
        assert refused.returncode != 0
        assert "flipped by another hand" in refused.stderr, refused.stderr
        assert f"Point {link} at {edited}" in refused.stderr
    assert record_path(link).read_bytes() == record
    assert Path(os.path.realpath(link)) == first
    flip_link(link, edited)  # pointed back: the rollback is published and recorded
    again = facegate("index", "publish", str(first), str(link), "--discard-live-changes")
    assert again.returncode == 0, again.stderr
    assert _refusal(link) is None


def test_a_rollbacks_copy_flipped_to_by_hand_after_a_roll_forward_is_refused(
    tmp_path: Path,
) -> None:
    """Rolled back from the edited release, then forward to that very release again: a
    hand flip back to the rollback's copy would undo the edit a second time. Its manifest
    records the rollback against the edited release, but the record beside the link is
    what facegate published last: the roll forward."""
    link, first, edited = _releases(tmp_path)
    rollback = facegate("index", "publish", str(first), str(link), "--discard-live-changes")
    assert rollback.returncode == 0, rollback.stderr
    copy = Path(os.path.realpath(link))
    forward = facegate("index", "publish", str(edited), str(link))
    assert forward.returncode == 0, forward.stderr
    assert _loaded(link).fingerprint == _loaded(edited).fingerprint
    flip_link(link, copy)  # by hand, within the same second as the rollback
    refusal = _refusal(link)
    assert refusal is not None and "1 removal(s)" in refusal


def test_the_record_names_a_release_before_the_link_flips_and_is_put_back_if_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two leaves the record ahead of the link (servers refuse to
    start: fail closed), never a flip without a record (they would start on anything)."""
    import filter.index_release as release_module

    link, _, edited = _releases(tmp_path)
    before = record_path(link).read_bytes()
    seen: list[str | None] = []
    real_flip = release_module.flip_link

    def failing_flip(target: Path, release: Path) -> None:
        recorded = last_published(target)
        seen.append(recorded.fingerprint if recorded else None)
        raise OSError("no space left on device")

    monkeypatch.setattr(release_module, "flip_link", failing_flip)
    result = facegate("index", "remove", str(link), "--identity", "person-1-1")
    assert result.returncode != 0 and "no space left" in result.stderr
    assert seen and seen[0] not in (None, _loaded(edited).fingerprint)  # the new release
    assert record_path(link).read_bytes() == before  # put back
    assert Path(os.path.realpath(link)) == edited
    monkeypatch.setattr(release_module, "flip_link", real_flip)
    assert _refusal(link) is None


def test_a_server_starting_during_a_publish_loads_again_and_starts(tmp_path: Path) -> None:
    """The record names the new release just before the link flips to it: a server that
    loaded the old one then is refused, sees the link moved and loads again."""
    link, first, edited = _releases(tmp_path)
    flip_link(link, first)  # as if the publish of `edited` had recorded it, not yet flipped
    loads: list[str] = []

    def load() -> LiveFilter:  # as the server loads: the folder the link names then
        loaded = _loaded(Path(os.path.realpath(link)))
        loads.append(loaded.fingerprint)
        flip_link(link, edited)  # the flip lands while the server loads
        return loaded

    live = start_live(link, load)
    assert live.fingerprint == _loaded(edited).fingerprint
    assert loads == [_loaded(first).fingerprint, live.fingerprint]
    flip_link(link, first)  # by hand, and it stays there: no start
    with pytest.raises(StartupError, match="1 removal"):
        start_live(link, lambda: _loaded(Path(os.path.realpath(link))))
