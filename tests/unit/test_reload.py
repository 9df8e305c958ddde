"""The swap itself, without models: whole batches on one filter, a refused load changes
nothing, reloads are serialised, the watch follows the path and skips what is loaded."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from filter.decide import DecisionThresholds, ImageVerdict
from filter.errors import IndexCorruptError
from filter.index_lineage import acknowledge
from service.reload import IndexReloader, LiveFilter, SwappableChecker, index_state


class Named:
    """A filter that answers with its name (in `detail`), optionally blocking mid-batch."""

    def __init__(self, name: str, gate: threading.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.started = threading.Event()

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: Any = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return [ImageVerdict(True, None, 1, 0.1, None, detail=self.name) for _ in images]


class Index:
    def __init__(self, fingerprint: str, manifest: dict[str, Any] | None = None) -> None:
        self.fingerprint = fingerprint
        self.salt = fingerprint.encode() * 16  # each index its own salt
        self.manifest = manifest or {}


class Thresholds:
    def __init__(self, identity: float = 0.5, replica: float | None = 0.6) -> None:
        self.decision = DecisionThresholds(identity, replica)

    def describe(self) -> str:
        return f"identity {self.decision.identity}, replica {self.decision.replica}"


def live(
    name: str,
    state: Any = None,
    gate: threading.Event | None = None,
    thresholds: Thresholds | None = None,
    manifest: dict[str, Any] | None = None,
) -> LiveFilter:
    return LiveFilter(
        Named(name, gate),
        Index(name, manifest),  # type: ignore[arg-type]
        thresholds or Thresholds(),  # type: ignore[arg-type]
        None,
        Path(name),
        state,
    )


class Observed:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.results: list[str] = []

    def index_loaded(self, live: LiveFilter) -> None:
        self.loaded.append(live.fingerprint)

    def reload_finished(self, result: str) -> None:
        self.results.append(result)


def test_a_batch_in_progress_finishes_on_the_filter_it_started_with() -> None:
    gate = threading.Event()
    old = Named("old", gate)
    swappable = SwappableChecker(old)
    out: list[list[ImageVerdict]] = []
    worker = threading.Thread(target=lambda: out.append(swappable.check([np.zeros(1)] * 3)))
    worker.start()
    assert old.started.wait(10)
    swappable.swap(Named("new"))  # mid-batch
    gate.set()
    worker.join(10)
    assert [v.detail for v in out[0]] == ["old"] * 3
    assert [v.detail for v in swappable.check([np.zeros(1)])] == ["new"]


def test_a_refused_load_keeps_the_old_filter_and_counts_a_failure() -> None:
    current = live("A")
    swappable = SwappableChecker(current.checker)
    observed = Observed()
    loads: list[Any] = [IndexCorruptError("vectors.faiss does not match"), live("B")]

    def load() -> LiveFilter:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    reloader = IndexReloader(load, swappable, current, observed)
    assert asyncio.run(reloader.reload("test")) is False
    assert swappable.current is current.checker and reloader.live is current
    assert observed.results == ["failure"] and observed.loaded == []
    assert asyncio.run(reloader.reload("test")) is True
    assert reloader.live.fingerprint == "B" and observed.loaded == ["B"]
    assert observed.results == ["failure", "success"]
    assert [v.detail for v in swappable.check([np.zeros(1)])] == ["B"]


def test_reloads_are_serialised() -> None:
    active = 0
    most = 0
    lock = threading.Lock()
    count = 0

    def load() -> LiveFilter:
        nonlocal active, most, count
        with lock:
            active += 1
            most = max(most, active)
            count += 1
            name = f"v{count}"
        threading.Event().wait(0.05)
        with lock:
            active -= 1
        return live(name)

    async def main() -> list[bool]:
        reloader = IndexReloader(load, SwappableChecker(Named("A")), live("A"), Observed())
        return await asyncio.gather(*(reloader.reload("burst") for _ in range(4)))

    assert asyncio.run(main()) == [True] * 4
    assert most == 1


def test_watch_reloads_on_a_link_flip_but_not_what_is_already_live(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(name)
    link = tmp_path / "current"
    link.symlink_to("a")
    observed = Observed()

    def load() -> LiveFilter:
        state = index_state(link)
        assert state is not None
        return live(Path(state[0]).name, state)

    async def main() -> None:
        reloader = IndexReloader(load, SwappableChecker(Named("a")), load(), observed)
        watcher = asyncio.get_running_loop().create_task(reloader.watch(link, 0.02))
        await asyncio.sleep(0.1)
        assert observed.results == []  # nothing changed
        os.replace(_link(tmp_path, "b"), link)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if observed.results:
                break
        assert reloader.live.fingerprint == "b"
        # A SIGHUP reload of a flip back: the watch must not load it a second time.
        os.replace(_link(tmp_path, "a"), link)
        await reloader.reload("SIGHUP")
        await asyncio.sleep(0.2)
        watcher.cancel()

    asyncio.run(main())
    assert observed.loaded == ["b", "a"]


def _link(folder: Path, target: str) -> Path:
    staging = folder / f".link-{target}"
    staging.symlink_to(target)
    return staging


def test_index_state_names_the_resolved_folder(tmp_path: Path) -> None:
    assert index_state(tmp_path / "missing") is None
    (tmp_path / "v1").mkdir()
    assert index_state(tmp_path / "v1") is None  # no manifest: not an index
    (tmp_path / "v1" / "manifest.json").write_text("{}")
    (tmp_path / "current").symlink_to("v1")
    state = index_state(tmp_path / "current")
    assert state is not None and state[0] == str((tmp_path / "v1").resolve())


@pytest.mark.parametrize("name", ["embedding", "index"])
def test_the_swappable_exposes_the_filter_in_force(name: str) -> None:
    inner = Named("x")
    setattr(inner, name, object())
    assert getattr(SwappableChecker(inner), name) is getattr(inner, name)


def ack(before: tuple[float, float | None], after: tuple[float, float | None]) -> dict[str, Any]:
    """A manifest acknowledging the step `before` -> `after` (as filter.index_lineage
    records it)."""
    manifest: dict[str, Any] = {}
    acknowledge(
        manifest,
        by="index publish --allow-looser",
        replaces="A",
        before=DecisionThresholds(*before),
        after=DecisionThresholds(*after),
    )
    return manifest


# What serves in these cases: identity 0.5, replica 0.6.
@pytest.mark.parametrize(
    ("new", "manifest", "result"),
    [
        (Thresholds(0.9, 0.6), {}, "refused_looser"),  # identity up: looser
        (Thresholds(0.5, 0.9), {}, "refused_looser"),  # replica up: looser
        (Thresholds(0.5, None), {}, "refused_looser"),  # replica off: looser
        (Thresholds(0.9, 0.6), ack((0.5, 0.6), (0.9, 0.6)), "success"),  # acknowledged step
        (Thresholds(0.9, 0.6), ack((0.3, 0.6), (0.9, 0.6)), "success"),  # within it
        # Given against a looser predecessor: a rollback after a stricter one went live.
        (Thresholds(0.9, 0.6), ack((0.6, 0.6), (0.9, 0.6)), "refused_looser"),
        (Thresholds(0.5, 0.9), ack((0.5, 0.7), (0.5, 0.9)), "refused_looser"),
        (Thresholds(0.5, None), ack((0.5, None), (0.5, None)), "refused_looser"),
        (Thresholds(0.9, 0.6), ack((0.5, 0.6), (0.8, 0.6)), "refused_looser"),  # beyond it
        # An acknowledgement that does not say what it covers covers nothing.
        (Thresholds(0.9, 0.6), {"looser_acknowledged": {"by": "x"}}, "refused_looser"),
        (Thresholds(0.4, 0.5), {}, "success"),  # stricter on both
        (Thresholds(0.5, 0.6), {}, "success"),  # the same
    ],
)
def test_a_reload_never_loosens_without_an_acknowledgement(
    new: Thresholds, manifest: dict[str, Any], result: str
) -> None:
    """Issue 19: an `index add` that dropped the calibration raised the replica threshold
    from 0.575 to 0.90 on every watching server; the reload only logged it."""
    current = live("A", thresholds=Thresholds(0.5, 0.6))
    swappable = SwappableChecker(current.checker)
    observed = Observed()
    reloader = IndexReloader(
        lambda: live("B", thresholds=new, manifest=manifest), swappable, current, observed
    )
    assert asyncio.run(reloader.reload("test")) is (result == "success")
    assert observed.results == [result]
    serving = "B" if result == "success" else "A"
    assert reloader.live.fingerprint == serving
    assert [v.detail for v in swappable.check([np.zeros(1)])] == [serving]


def test_a_link_flipped_by_hand_to_an_older_release_is_refused_a_published_rollback_served(
    tmp_path: Path,
) -> None:
    """The edit-history rule `index publish` keeps, kept by the servers too: a link flipped
    by hand back to the release before an `index remove` (or an opt-out's `index add`)
    would undo it on every watching server. Only a rollback published knowingly, recorded
    against the index serving, is served."""
    from filter.index import FaissIdentityIndex
    from filter.index_lineage import discard_acknowledged
    from filter.index_release import flip_link
    from service.reload_guard import release_refusal
    from tests.commands import facegate
    from tests.unit.test_index_atomic import small_index

    release = tmp_path / "releases" / "r1"
    small_index(1).save(release)
    link = tmp_path / "current"
    flip_link(link, release)
    removed = facegate("index", "remove", str(link), "--identity", "person-1-0")
    assert removed.returncode == 0, removed.stderr
    edited = Path(os.path.realpath(link))

    def loaded(path: Path) -> LiveFilter:
        index = FaissIdentityIndex.load(path)
        thresholds = Thresholds()
        return LiveFilter(Named(index.fingerprint), index, thresholds, None, path, None)  # type: ignore[arg-type]

    serving = loaded(edited)
    swappable = SwappableChecker(serving.checker)
    observed = Observed()
    flip_link(link, release)  # by hand
    refusal = release_refusal(serving, loaded(link))
    assert refusal is not None and refusal.result == "refused_diverged"
    assert "1 removal(s), whose identities would be back" in refusal.reason
    reloader = IndexReloader(lambda: loaded(link), swappable, serving, observed)
    assert asyncio.run(reloader.reload("test")) is False
    assert observed.results == ["refused_diverged"]
    assert reloader.live is serving
    assert [v.detail for v in swappable.check([np.zeros(1)])] == [serving.fingerprint]

    flip_link(link, edited)
    published = facegate("index", "publish", str(release), str(link), "--discard-live-changes")
    assert published.returncode == 0, published.stderr
    rollback = loaded(link)
    rollback_folder = Path(os.path.realpath(link))
    ack = discard_acknowledged(rollback.index.manifest, serving.fingerprint)
    assert ack is not None and "1 removal(s)" in ack["undoes"]
    assert discard_acknowledged(rollback.index.manifest, "another index") is None
    assert release_refusal(serving, rollback) is None
    assert asyncio.run(reloader.reload("test")) is True
    assert reloader.live.fingerprint == rollback.fingerprint != serving.fingerprint
    # The rollback's copy has its own fingerprint but the lineage of r1: rolling forward to
    # the edited index again undoes nothing, for publish and for the servers alike.
    forward = facegate("index", "publish", str(edited), str(link))
    assert forward.returncode == 0, forward.stderr
    assert release_refusal(rollback, loaded(link)) is None
    assert asyncio.run(reloader.reload("test")) is True
    assert reloader.live.fingerprint == serving.fingerprint
    # A hand flip back to that rollback's copy later: its record names the index serving
    # again, but it was given before this server began serving it (the roll forward), for
    # an earlier time, so the servers refuse it as any hand flip.
    import time
    from dataclasses import replace

    later = replace(reloader.live, loaded_at=time.time() + 5)
    refusal = release_refusal(later, loaded(rollback_folder))
    assert refusal is not None and refusal.result == "refused_diverged"
    assert "predates this server's load" in refusal.reason
