"""Operator audit log: one JSON line per rejected candidate, never image data.

This is the only place, besides aggregated metrics, where similarity scores and
identity ids go. Callers of the API never see them.

Lines are written by one writer thread from a bounded queue, so a slow or stalled
destination (a blocked stderr pipe, a full disk) never stalls the event loop. When the
queue is full a line is dropped, counted (`on_drop`, the metric
facegate_audit_dropped_lines_total) and reported in the log itself by an
`audit_lines_dropped` line as soon as the writer catches up: no line is lost silently.

The log says who is in the training set (identities): a file destination is created
owner-only (0600), and `hash_identities` writes each identity as a keyed hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Protocol

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


class AuditSink(Protocol):
    def rejection(self, record: Rejection) -> None: ...

    def close(self) -> None: ...


def identity_hasher(key: bytes | None) -> Callable[[str], str]:
    """Identity -> pseudonym. Keyed (HMAC-SHA256 with the seed key) when a key is given, so
    that nobody without the key can test a guessed name against the log; plain SHA-256
    otherwise (still linkable by whoever holds the index's labels)."""

    def digest(identity: str) -> str:
        data = identity.encode("utf-8")
        if key is not None:
            return "hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest()[:32]
        return "sha256:" + hashlib.sha256(data).hexdigest()[:32]

    return digest


def open_owner_only(path: Path) -> IO[str]:
    """Append to `path`, creating it 0600 (and its folder 0700) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


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
        hash_identities: bool = False,
        key: bytes | None = None,
    ) -> AuditSink:
        if destination == "none":
            return NullAuditLog()
        hasher = identity_hasher(key) if hash_identities else None
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
        if record.similarity is not None:
            line["similarity"] = round(record.similarity, 6)
        if self._hash is not None and record.identity is not None:
            line["identity"] = self._hash(record.identity)
        try:
            self._queue.put_nowait(json.dumps(line, sort_keys=True))
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
