"""Issue 9 §8 and §9: SIGTERM during loading, the client's receive limit, an audit log
off the event loop that never loses lines silently, hashed identities, owner-only files."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import service.server as server_module
from service.audit import JsonLinesAuditLog, Rejection, identity_hasher
from service.config import Settings
from service.server import MAX_MESSAGE_BYTES, run_server
from service.tls import client_options
from tests.conftest import REPO


def _rejection(n: int, identity: str = "alice-smith") -> Rejection:
    return Rejection(f"req{n}", 0, n, "identity_match", 0.71, identity, 1)


def test_sigterm_during_model_loading_exits_promptly(
    demo_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loading = threading.Event()

    def slow_load(settings: Settings, metrics: object) -> object:
        loading.set()
        time.sleep(30)  # a large model on a slow disk
        raise RuntimeError("never reached in this test")

    monkeypatch.setattr(server_module, "load_service", slow_load)
    settings = Settings(  # type: ignore[call-arg]
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        index_path=demo_index,
        audit_log="none",
        grace_seconds=10.0,
    )

    def terminate_when_loading() -> None:
        assert loading.wait(30)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_loading, daemon=True).start()
    start = time.monotonic()
    assert asyncio.run(run_server(settings)) == 0
    assert time.monotonic() - start < 5.0


def test_the_client_accepts_the_largest_response_the_server_sends() -> None:
    options = dict(client_options())
    assert options["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES


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
    audit = JsonLinesAuditLog.open(str(path), hash_identities=True, key=key)
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


def test_cli_demo_index_is_keyed_and_owner_only(tmp_path: Path) -> None:
    key = tmp_path / "seed.key"
    key.write_bytes(os.urandom(32))
    env = {
        **os.environ,
        "FACEGATE_MODELS_DIR": str(REPO / "models"),
        "FACEGATE_SEED_KEY_FILE": str(key),
    }
    out = tmp_path / "index"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "index",
            "demo",
            "--out",
            str(out),
            "--identities",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "not set" not in result.stderr  # keyed: no unkeyed warning
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert any(":keyed" in p.read_text() for p in files if p.suffix == ".json")
