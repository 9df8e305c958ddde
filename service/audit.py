"""Operator audit log: one JSON line per rejected candidate, never image data.

This is the only place, besides aggregated metrics, where similarity scores and
identity ids go. Callers of the API never see them.

Lines are written by one writer thread from a bounded queue, so a slow or stalled
destination (a blocked stderr pipe, a full disk) never stalls the event loop. When the
queue is full a line is dropped, counted (`on_drop`, the metric
facegate_audit_dropped_lines_total) and reported in the log itself by an
`audit_lines_dropped` line as soon as the writer catches up: no line is lost silently.

The log says who is in the training set (identities). The server writes each identity
as a keyed pseudonym (HMAC-SHA256 under a subkey of the seed key, or of an audit key of its
own: filter.keys), unless the operator opted into clear text; `facegate audit hash LABEL`
gives an operator the pseudonym of a label they already know. A file destination is opened
owner-only (0600) and never through a symlink or a second hard link.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Protocol

from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest

DEFAULT_QUEUE_LINES = 10_000
_STOP = object()


@dataclass(frozen=True)
class Rejection:
    request_id: str
    slot: int
    attempt: int
    reason: str
    similarity: float | None
    identity: str | None
    faces: int
    client: str | None = None  # verified client-certificate subject, when mutual TLS is on
    caller_request_id: str | None = None  # the caller's x-request-id (validated), if sent
    # The best replica similarity (a `replica` rejection's score; `similarity` is the best
    # face's, which for a replica may be another identity's or none).
    replica_similarity: float | None = None


class AuditSink(Protocol):
    def rejection(self, record: Rejection) -> None: ...

    def close(self) -> None: ...


class AuditFileError(OSError):
    """The audit file cannot be opened safely; the message names it and why."""


def identity_hasher(master: bytes) -> Callable[[str], str]:
    """Identity -> keyed pseudonym, under the audit subkey of `master` (the seed key, or an
    audit key of its own): the same digest `facegate audit hash` prints and index-edit
    records carry. Nobody without the key can test a guessed name against the log."""
    subkey = derive_subkey(master, AUDIT_IDENTITY)

    def digest(identity: str) -> str:
        return identity_digest(subkey, identity)

    return digest


def open_owner_only(path: Path) -> IO[str]:
    """Append to `path`, creating it 0600 (and a missing folder 0700). The file itself is
    never opened through a symlink, must be a regular file with no other hard link (either
    would let whoever planted it redirect identities into a file of their choosing), and is
    made owner-only whatever its mode was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if path.is_symlink():
            raise AuditFileError(
                f"FACEGATE_AUDIT_LOG {path} is a symlink; the audit log is never written "
                "through one: name the file itself"
            ) from None
        raise AuditFileError(
            f"FACEGATE_AUDIT_LOG {path} cannot be opened: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuditFileError(f"FACEGATE_AUDIT_LOG {path} is not a regular file")
        if info.st_nlink > 1:
            raise AuditFileError(
                f"FACEGATE_AUDIT_LOG {path} has {info.st_nlink} hard links; the audit log "
                "must be a file of its own"
            )
        os.set_blocking(fd, True)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class JsonLinesAuditLog:
    def __init__(
        self,
        stream: IO[str],
        owns_stream: bool = False,
        *,
        max_queue: int = DEFAULT_QUEUE_LINES,
        on_drop: Callable[[], None] | None = None,
        hash_identity: Callable[[str], str] | None = None,
    ) -> None:
        self._stream = stream
        self._owns = owns_stream
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._on_drop = on_drop
        self._hash = hash_identity
        self._dropped = 0  # since the last report; guarded by _lock
        self._dropped_total = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(
        cls,
        destination: str,
        *,
        on_drop: Callable[[], None] | None = None,
        hash_identity: Callable[[str], str] | None = None,
    ) -> AuditSink:
        """`hash_identity` None writes identities in clear text (an explicit opt-in)."""
        if destination == "none":
            return NullAuditLog()
        hasher = hash_identity
        if destination == "stderr":
            return cls(sys.stderr, on_drop=on_drop, hash_identity=hasher)
        return cls(
            open_owner_only(Path(destination)),
            owns_stream=True,
            on_drop=on_drop,
            hash_identity=hasher,
        )

    @property
    def dropped(self) -> int:
        return self._dropped_total

    def rejection(self, record: Rejection) -> None:
        """Format and enqueue; never blocks (called on the event loop)."""
        line = {"time": _now(), "event": "candidate_rejected", **asdict(record)}
        for score in ("similarity", "replica_similarity"):
            value = getattr(record, score)
            if value is not None:
                # A search that found no neighbour scores NaN, which JSON cannot say.
                line[score] = round(value, 6) if math.isfinite(value) else None
        if self._hash is not None and record.identity is not None:
            line["identity"] = self._hash(record.identity)
        try:
            self._queue.put_nowait(json.dumps(line, sort_keys=True, allow_nan=False))
        except queue.Full:
            with self._lock:
                self._dropped += 1
                self._dropped_total += 1
            if self._on_drop is not None:
                self._on_drop()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._report_drops()
                if item is _STOP:
                    return
                self._stream.write(f"{item}\n")
                self._stream.flush()
            except (OSError, ValueError):
                with self._lock:  # the destination failed: count, keep serving
                    self._dropped += 1
                    self._dropped_total += 1
                if self._on_drop is not None:
                    self._on_drop()
            finally:
                self._queue.task_done()

    def _report_drops(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            line = {"time": _now(), "event": "audit_lines_dropped", "count": dropped}
            self._stream.write(json.dumps(line, sort_keys=True) + "\n")
            self._stream.flush()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued line is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._writer.join(timeout)
        if self._owns:
            self._stream.close()


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class NullAuditLog:
    def rejection(self, record: Rejection) -> None:
        return None

    def close(self) -> None:
        return None
