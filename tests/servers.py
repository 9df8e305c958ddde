"""Helpers to run real facegate servers on loopback: in-process (for fault injection)
and as a subprocess (for signals)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings
from service.server import FacegateServer, ServiceLoader, load_service
from tests.conftest import REPO, write_seed_key

# The threshold the servers run the demo index at.
DEMO_THRESHOLD = 0.56


def settings_for(index: Path, tmp_path: Path, **overrides: object) -> Settings:
    """Loopback settings for a server over `index` on free ports, keyed with the test key."""
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "index_path": index,
        "threshold": DEMO_THRESHOLD,
        "models_dir": REPO / "models",
        "device": "cpu",
        "audit_log": str(tmp_path / "audit.jsonl"),
        "grace_seconds": 10.0,
    }
    values.update(overrides)
    if "seed_key_file" not in values:
        values["seed_key_file"] = write_seed_key(tmp_path)
    return Settings(**values)  # type: ignore[arg-type]


class InProcessServer:
    """A server on its own event loop thread. With `wait=False` the constructor returns as
    soon as the server listens (models may still be loading); `started()` waits for the rest."""

    def __init__(
        self, settings: Settings, loader: ServiceLoader = load_service, *, wait: bool = True
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = FacegateServer(settings, loader)
        self._start = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        if wait:
            self.started()
        else:
            deadline = time.monotonic() + 60
            while not (self.server.grpc_port and self.server.server is not None):
                if self._start.done() or time.monotonic() > deadline:
                    self._start.result(0)  # raises what stopped the start
                    raise TimeoutError("the server never started listening")
                time.sleep(0.02)
        self.target = f"127.0.0.1:{self.server.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def started(self, timeout: float = 180) -> None:
        self._start.result(timeout)

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.drain(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SubprocessServer:
    def __init__(self, env: dict[str, str | None], log_path: Path) -> None:
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        full_env = {
            **os.environ,
            "FACEGATE_GRPC_HOST": "127.0.0.1",
            "FACEGATE_GRPC_PORT": str(self.grpc_port),
            "FACEGATE_METRICS_PORT": str(self.metrics_port),
            "FACEGATE_MODELS_DIR": str(REPO / "models"),
            # The test key, the demo index's (tests.conftest); `env` may replace or drop it.
            "FACEGATE_SEED_KEY_FILE": str(write_seed_key(log_path.parent)),
            **env,
        }
        full_env = {k: v for k, v in full_env.items() if v is not None}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
                found = True
    if not found:
        raise KeyError(f"{name}{labels or ''} not in metrics")
    return total


def requests_total(metrics_url: str, method: str, code: str) -> float:
    try:
        return metric_value(
            scrape(metrics_url), "facegate_requests_total", {"method": method, "code": code}
        )
    except KeyError:
        return 0.0


def wait_until(condition: Any, what: str, timeout: float = 60.0, every: float = 0.02) -> None:
    """Poll `condition()` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
