"""Issue 9 §8 and §9: SIGTERM during loading, the client's receive limit, an audit log
off the event loop that never loses lines silently, hashed identities, owner-only files."""

from __future__ import annotations

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

from filter.keys import AUDIT_IDENTITY, derive_subkey, identity_digest
from service.audit import JsonLinesAuditLog, Rejection, identity_hasher
from service.server import MAX_MESSAGE_BYTES
from service.tls import client_options
from tests.conftest import REPO, write_seed_key
from tests.servers import free_port


def _rejection(n: int, identity: str = "alice-smith") -> Rejection:
    return Rejection(f"req{n}", 0, n, "identity_match", 0.71, identity, 1)


SLOW_LOADER = """
import re, sys
import service.server as server

def load_holding_the_gil(settings, metrics):
    # A native loader that holds the GIL for a long time (here: a regex backtracking in C).
    re.match(r"(a+)+$", "a" * 64 + "b")

server.load_service = load_holding_the_gil
from service.config import load_settings
sys.exit(server.main_serve(load_settings()))
"""


def test_sigterm_during_model_loading_exits_promptly(demo_index: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")},
        "FACEGATE_GRPC_HOST": "127.0.0.1",
        "FACEGATE_GRPC_PORT": str(port),
        "FACEGATE_METRICS_ENABLED": "false",
        "FACEGATE_INDEX_PATH": str(demo_index),
        "FACEGATE_AUDIT_LOG": "none",
        "FACEGATE_SEED_KEY_FILE": str(write_seed_key(tmp_path)),
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_LOADER], cwd=REPO, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while "loading models" not in log.read_text():  # listening, loading (GIL held)
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        assert time.monotonic() - start < 2.0
        assert code == -signal.SIGTERM  # nothing to drain yet: the default action
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


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
