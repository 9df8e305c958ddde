"""Operator audit log: one JSON line per rejected candidate, never image data.

This is the only place, besides aggregated metrics, where similarity scores and
identity ids go. Callers of the API never see them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Protocol


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


class JsonLinesAuditLog:
    def __init__(self, stream: IO[str], owns_stream: bool = False) -> None:
        self._stream = stream
        self._owns = owns_stream
        self._lock = threading.Lock()

    @classmethod
    def open(cls, destination: str) -> AuditSink:
        if destination == "none":
            return NullAuditLog()
        if destination == "stderr":
            return cls(sys.stderr)
        path = Path(destination)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path.open("a", buffering=1, encoding="utf-8"), owns_stream=True)

    def rejection(self, record: Rejection) -> None:
        now = time.time()
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "event": "candidate_rejected",
            **asdict(record),
        }
        if record.similarity is not None:
            line["similarity"] = round(record.similarity, 6)
        text = json.dumps(line, sort_keys=True)
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owns:
            self._stream.close()


class NullAuditLog:
    def rejection(self, record: Rejection) -> None:
        return None

    def close(self) -> None:
        return None
