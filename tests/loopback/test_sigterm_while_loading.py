"""A server told to stop (SIGTERM) while its models load, even by a loader that holds the
GIL, exits promptly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, write_seed_key
from tests.servers import free_port

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
