"""The live identity filter and its hot reload.

Startup and every reload go through `load_live_filter`: the index at FACEGATE_INDEX_PATH
(a symlink is resolved each time, so operators flip a link to swap indexes whole) is
loaded and fully validated by the same code as at startup (integrity, embedder, detector,
dimension, metric, not empty, self-test), its saved calibration applies unless a
threshold is set explicitly, and the detection policy and shadow thresholds are applied.

Only a filter that loaded completely replaces the one in use. The swap is one reference
assignment in `SwappableChecker`, read once per batch by the engine: the batch in
progress finishes with the old index, the next one uses the new. A reload that fails for
any reason keeps the old index serving and says why in the log and the metrics.

A reload never loosens silently: an index whose thresholds (as this server resolves them)
are looser than those serving now is refused (`refused_looser`) unless its manifest
carries an acknowledgement given for that release and covering this step: from
thresholds no stricter than those it was given against (filter.index_lineage). Startup
warns where the index's calibration is looser than the defaults, saying whether an
acknowledgement covers that step (`service.threshold_notices`; it does not refuse: a restart
cannot know what served before). An explicit threshold setting is the operator's own
choice and is not refused, but logged as a warning where it is looser.

Nor does a reload undo identity edits silently: an index not made from the one serving,
that would undo its removals or additions (a link flipped by hand to an older release),
is refused (`refused_diverged`) unless it records a rollback chosen against the index
serving (`index publish --discard-live-changes`; `service.reload_guard`). Startup, with
nothing serving, compares a link's index with the release facegate last published there
(filter.release_record) and refuses to start on one that would undo its edits; a plain
folder it serves as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from filter.assembly import open_filter
from filter.calibrate import same_person_floor_warning
from filter.decide import DecisionThresholds, ImageVerdict
from filter.detection_policy import filter_for_generator
from filter.embedders import resolve_device
from filter.identity_filter import FaceEmbeddingPipeline, StageObserver
from filter.index import MANIFEST_FILE, FaissIdentityIndex, IdentityIndex
from filter.shadow import ShadowedFilter, ShadowObserver, ShadowThresholds
from filter.thresholds import FilterInForce, Thresholds
from service.config import Settings
from service.engine import FilterSnapshot, ImageChecker
from service.live_index import (
    RELOAD_FAILURE,
    RELOAD_SUCCESS,
    LiveIndexFacts,
)
from service.reload_guard import Refusal, release_refusal
from service.threshold_notices import override_warnings

log = logging.getLogger("facegate.reload")

IndexState = tuple[str, int, int, int]  # resolved folder, manifest inode, mtime_ns, size


def index_state(path: Path) -> IndexState | None:
    """What identifies the index the path names right now; None if there is none."""
    try:
        resolved = Path(path).resolve(strict=True)
        stat = (resolved / MANIFEST_FILE).stat()
    except (OSError, RuntimeError):
        return None
    return (str(resolved), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class LiveFilter:
    """A loaded filter and what it was loaded from."""

    checker: ImageChecker  # what the engine calls
    index: FaissIdentityIndex
    thresholds: Thresholds
    shadow: DecisionThresholds | None  # None: no shadow thresholds configured
    path: Path  # the folder the index was read from (symlinks resolved)
    state: IndexState | None  # of FACEGATE_INDEX_PATH, taken before reading
    loaded_at: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    @property
    def in_force(self) -> FilterInForce:
        """What a released image's content credentials say it was checked against."""
        return FilterInForce(self.index.fingerprint, self.thresholds)

    @property
    def snapshot(self) -> FilterSnapshot:
        """What the engine reads once per batch: the checker, its provenance, its salt."""
        return FilterSnapshot(self.checker, self.in_force, self.index.salt)

    @property
    def facts(self) -> LiveIndexFacts:
        """What the metrics show of this filter (service.metrics reads no service type)."""
        manifest = self.index.manifest
        shadow = self.shadow
        return LiveIndexFacts(
            fingerprint=self.index.fingerprint,
            format_version=str(manifest.get("format_version")),
            index_type=str(manifest.get("index_type")),
            calibrated=bool(self.index.calibration),
            identities=self.index.identity_count,
            vectors=self.index.vector_count,
            identity_threshold=self.thresholds.identity,
            replica_threshold=self.thresholds.replica,
            shadow_identity=None if shadow is None else shadow.identity,
            shadow_replica=None if shadow is None else shadow.replica,
            loaded_at=self.loaded_at or time.time(),
        )


def load_live_filter(
    settings: Settings,
    embedding: FaceEmbeddingPipeline,
    generator_name: str,
    shadow_observer: ShadowObserver,
) -> LiveFilter:
    """Load the index at FACEGATE_INDEX_PATH into a ready filter (blocking: run it off the
    event loop). Raises whatever refuses the index; nothing is swapped here."""
    state = index_state(settings.index_path)
    folder = Path(state[0]) if state is not None else Path(settings.index_path)
    opened = open_filter(
        embedding,
        folder,
        settings.no_face_policy,
        threshold=settings.threshold,
        replica_threshold=settings.replica_threshold,
    )
    index, thresholds = opened.index, opened.thresholds
    log.info("thresholds in force: %s", thresholds.describe())
    for warning in override_warnings(index, thresholds):
        log.warning("%s", warning)
    if not index.salt:
        log.warning(
            "index %s has no salt (built before facegate salted seeds): the same seed keeps "
            "its candidates across this index's edits, which lets a caller compare before "
            "and after. Rebuild it, or edit it once with `facegate index add` / `remove`, "
            "which give it one",
            folder,
        )
    floor = same_person_floor_warning(embedding.embedder.name, thresholds.identity)
    if floor is not None:
        log.warning("%s", floor)
    index.use_device(str(resolve_device(settings.device)))
    scoped = filter_for_generator(opened.filter, generator_name, settings.generated_fast_path)
    checker: ImageChecker = scoped
    shadow_overrides = ShadowThresholds(
        settings.shadow_threshold, settings.shadow_replica_threshold
    )
    shadow = None
    if shadow_overrides.enabled:
        shadow = shadow_overrides.applied_to(thresholds.decision)
        checker = ShadowedFilter(scoped, shadow, shadow_observer)
        log.info(
            "shadow thresholds (evaluated, never acted on): identity %s, replica %s",
            shadow.identity,
            shadow.replica,
        )
    return LiveFilter(checker, index, thresholds, shadow, folder, state)


class SwappableChecker:
    """The engine's filter: one reference, replaced whole, read once per batch. The checker,
    what it was loaded from (index fingerprint, thresholds) and its index's salt are one
    snapshot, swapped together, so a batch is drawn for, checked by and attributed to the
    same filter."""

    def __init__(
        self, current: ImageChecker, in_force: FilterInForce | None = None, salt: bytes = b""
    ) -> None:
        self._snapshot = FilterSnapshot(current, in_force, salt)

    @property
    def current(self) -> ImageChecker:
        return self._snapshot.checker

    def swap(
        self, new: ImageChecker, in_force: FilterInForce | None = None, salt: bytes = b""
    ) -> None:
        self._snapshot = FilterSnapshot(new, in_force, salt)

    def snapshot(self) -> FilterSnapshot:
        return self._snapshot

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        return self._snapshot.checker.check(images, observer=observer, candidates=candidates)

    # Beyond `check`, callers (tests, benches) read these two of the filter in force; only
    # these pass through, so nothing else reaches the filter behind the swap unnoticed.
    @property
    def embedding(self) -> FaceEmbeddingPipeline:
        return cast(_InspectableChecker, self._snapshot.checker).embedding

    @property
    def index(self) -> IdentityIndex:
        return cast(_InspectableChecker, self._snapshot.checker).index


class _InspectableChecker(Protocol):
    """What `SwappableChecker` forwards: IdentityFilter and ShadowedFilter have both."""

    @property
    def embedding(self) -> FaceEmbeddingPipeline: ...

    @property
    def index(self) -> IdentityIndex: ...


class ReloadObserver(Protocol):
    def index_loaded(self, live: LiveFilter) -> None: ...
    def reload_finished(self, result: str) -> None:
        """`result` is one of RELOAD_RESULTS."""
        ...


class FactsObserver(Protocol):
    """A ReloadObserver told values only (service.metrics): see `ReloadFacts`."""

    def index_loaded(self, facts: LiveIndexFacts) -> None: ...
    def reload_finished(self, result: str) -> None: ...


class ReloadFacts:
    """Adapts a FactsObserver to a ReloadObserver: hands on the live filter's facts."""

    def __init__(self, sink: FactsObserver) -> None:
        self.sink = sink

    def index_loaded(self, live: LiveFilter) -> None:
        self.sink.index_loaded(live.facts)

    def reload_finished(self, result: str) -> None:
        self.sink.reload_finished(result)


class IndexReloader:
    """Reloads serialised: a SIGHUP during a reload waits for it, then loads again."""

    def __init__(
        self,
        load: Callable[[], LiveFilter],
        target: SwappableChecker,
        live: LiveFilter,
        observer: ReloadObserver,
        guard: Callable[[LiveFilter, LiveFilter], Refusal | None] = release_refusal,
    ) -> None:
        self._load = load
        self.target = target
        self.live = live
        self.observer = observer
        self.guard = guard
        self._lock = asyncio.Lock()

    async def reload(self, reason: str, state: IndexState | None = None) -> bool:
        """Load and swap in the index the path names now. With `state` (from the watch),
        skip the load if a reload that ran meanwhile already made that state live."""
        async with self._lock:
            if state is not None and state == self.live.state:
                return True
            old = self.live
            log.info("reloading the identity index (%s)", reason)
            started = time.perf_counter()
            try:
                live = await asyncio.to_thread(self._load)
            except Exception as exc:  # any refusal keeps the old index serving
                log.error(
                    "index reload (%s) refused; still serving index %s from %s: %s",
                    reason,
                    old.fingerprint,
                    old.path,
                    exc,
                )
                self.observer.reload_finished(RELOAD_FAILURE)
                return False
            refusal = self.guard(old, live)
            if refusal is not None:
                log.error(
                    "index reload (%s) refused; still serving index %s from %s: index %s "
                    "from %s: %s",
                    reason,
                    old.fingerprint,
                    old.path,
                    live.fingerprint,
                    live.path,
                    refusal.reason,
                )
                self.observer.reload_finished(refusal.result)
                return False
            self.target.swap(live.checker, live.in_force, live.index.salt)
            self.live = live
            self.observer.index_loaded(live)
            self.observer.reload_finished(RELOAD_SUCCESS)
            log.info(
                "index reloaded in %.1f s (%s): %s -> %s from %s; thresholds %s",
                time.perf_counter() - started,
                reason,
                old.fingerprint,
                live.fingerprint,
                live.path,
                live.thresholds.describe(),
            )
            return True

    async def watch(self, path: Path, interval: float) -> None:
        """Reload when the index that `path` names changes (a flipped symlink, a folder
        renamed over the old one). A change that fails to load is not retried until the
        path changes again; SIGHUP still retries at once."""
        seen = self.live.state
        while True:
            await asyncio.sleep(interval)
            state = await asyncio.to_thread(index_state, path)
            if state is None or state == seen:
                continue  # missing for a moment (mid-swap) or unchanged: keep serving
            seen = state
            await self.reload("index path changed", state)
