"""The audit log: written off the event loop, it never blocks and never loses lines
silently (drops are counted); identities are hashed with a subkey of the seed key, and the
file is owner-only."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from filter.decide import ImageVerdict, Reason
from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest
from service.audit import JsonLinesAuditLog, Rejection, identity_hasher
from service.batcher import DynamicBatcher
from service.engine import CandidateEngine
from service.pipeline import GenerationPipeline, GenerationRequest
from tests.fakes import ScriptedFilter


def _rejection(n: int, identity: str = "alice-smith") -> Rejection:
    return Rejection(f"req{n}", 0, n, "identity_match", 0.71, identity, 1)


class StalledStream(io.StringIO):
    """A destination that blocks every write until released (a full stderr pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait()
        return super().write(text)


def test_a_stalled_audit_destination_never_blocks_and_drops_are_counted() -> None:
    stream = StalledStream()
    drops: list[int] = []
    audit = JsonLinesAuditLog(stream, max_queue=10, on_drop=lambda: drops.append(1))
    start = time.monotonic()
    for n in range(200):
        audit.rejection(_rejection(n))
    assert time.monotonic() - start < 0.5  # the event loop would not have stalled
    assert 180 <= audit.dropped == len(drops) <= 190
    stream.release.set()
    audit.flush()
    audit.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = [r for r in lines if r["event"] == "candidate_rejected"]
    reported = sum(r["count"] for r in lines if r["event"] == "audit_lines_dropped")
    assert reported == audit.dropped  # every dropped line is reported in the log itself
    assert len(written) + reported == 200


def test_hashed_identities_and_owner_only_audit_file(tmp_path: Path) -> None:
    key = bytes(range(32))
    path = tmp_path / "logs" / "audit.jsonl"
    audit = JsonLinesAuditLog.open(str(path), hash_identity=identity_hasher(key))
    assert isinstance(audit, JsonLinesAuditLog)
    audit.rejection(_rejection(1, "alice-smith"))
    audit.rejection(_rejection(2, "alice-smith"))
    audit.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "alice" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["identity"] == records[1]["identity"] == identity_hasher(key)("alice-smith")
    assert records[0]["identity"].startswith("hmac-sha256:")
    assert identity_hasher(bytes(32))("alice-smith") != records[0]["identity"]
    # The one derivation (filter.keys): a subkey of the master, never the master itself.
    expected = identity_digest(derive_subkey(key, AUDIT_IDENTITY), "alice-smith")
    assert records[0]["identity"] == expected


class _ReplicaFirst(ScriptedFilter):
    """Holds back the first candidate as a replica of a training image (its best face
    similarity low, its replica similarity high); passes the rest."""

    def _verdict(self, passed: bool) -> ImageVerdict:
        if passed:
            return super()._verdict(passed)
        return ImageVerdict(
            passed=False,
            reason=Reason.REPLICA,
            faces=1,
            max_similarity=0.2,
            identity=self.label,
            replica_similarity=0.95,
        )


class _Sink:
    def __init__(self) -> None:
        self.records: list[Rejection] = []

    def rejection(self, record: Rejection) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def test_a_replica_rejection_records_the_replica_similarity() -> None:
    """The audit line of a `replica` rejection carries the score that rejected it, not
    only the best face's (another identity's, or none)."""
    checker = _ReplicaFirst(lambda call, position: (call, position) != (0, 0))
    sink = _Sink()

    async def run() -> None:
        batcher = DynamicBatcher(CandidateEngine(_FlatGenerator(), checker), max_delay=0.001)
        pipe = GenerationPipeline(batcher, 4, max_attempts=3, max_count=4, audit=sink)
        await pipe.generate(GenerationRequest(count=1, seed=3))
        await batcher.close()

    asyncio.run(run())
    [record] = sink.records
    assert (record.reason, record.similarity, record.replica_similarity) == ("replica", 0.2, 0.95)
    stream = io.StringIO()
    audit = JsonLinesAuditLog(stream)
    audit.rejection(record)
    audit.close()
    line = json.loads(stream.getvalue())
    assert (line["similarity"], line["replica_similarity"]) == (0.2, 0.95)


class _FlatGenerator:
    name = "flat"
    latent_dim = 4
    model_sha256 = "0" * 64

    def generate(self, latents: np.ndarray) -> np.ndarray:
        return np.zeros((len(latents), 8, 8, 3), np.uint8)


def test_a_score_that_is_not_a_number_is_written_as_null() -> None:
    """A filter_error whose replica search found no neighbour scored NaN, and the audit
    line said `NaN`, which strict JSON readers (Go, Elasticsearch) refuse: the very lines
    an operator needs most."""
    stream = io.StringIO()
    audit = JsonLinesAuditLog(stream)
    nan = float("nan")
    audit.rejection(Rejection("req1", 0, 1, "filter_error", nan, None, 1, replica_similarity=nan))
    audit.close()
    line = json.loads(stream.getvalue(), parse_constant=lambda name: pytest.fail(name))
    assert line["similarity"] is None and line["replica_similarity"] is None
    assert line["reason"] == "filter_error"
