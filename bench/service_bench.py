"""Service throughput with concurrent callers: cross-request batching against
per-request batches, each a real server subprocess on loopback, measured in one run, the
modes taking turns in rounds.

    python -m bench.service_bench [--device cpu|cuda] [--seconds S] [--callers N] [--count C]
    python -m bench.service_bench --smoke     # a few seconds, to check the script

On a GPU (`--device cuda`) the callers and batches are larger. Cross-request batching is
measured with one filter batch in flight and with the default (FACEGATE_BATCHES_IN_FLIGHT):
on a GPU two, overlapped stage by stage; on the CPU a lane per core."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import MODELS, REPO, emit
from filter.assembly import build_embedding_pipeline
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.servers import free_port

THRESHOLD = "0.56"


def _start(
    index: Path, env: dict[str, str], log: Path, device: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full = {
        **os.environ,
        "FACEGATE_INDEX_PATH": str(index),
        "FACEGATE_SEED_KEY_FILE": str(index.parent / "seed.key"),
        "FACEGATE_THRESHOLD": THRESHOLD,
        "FACEGATE_GRPC_HOST": "127.0.0.1",
        "FACEGATE_GRPC_PORT": str(port),
        "FACEGATE_METRICS_PORT": str(free_port()),
        "FACEGATE_MODELS_DIR": str(MODELS),
        "FACEGATE_AUDIT_LOG": "none",
        "FACEGATE_MAX_CONCURRENT_REQUESTS": "256",
        "FACEGATE_DEVICE": device,
        "FACEGATE_LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=full,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, target
            except grpc.RpcError:
                time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


@dataclass
class _Tally:
    """What the callers got from one server, over every round of its load."""

    released: int = 0
    seconds: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies)
        return {
            "images_per_s": round(self.released / self.seconds, 1),
            "requests": len(self.latencies),
            "errors": self.errors,
            "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3),
        }


async def _load(target: str, callers: int, count: int, seconds: float, tally: _Tally) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await stub.Generate(pb.GenerateRequest(count=count), timeout=120)  # warm-up
        stop = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    response = await stub.Generate(pb.GenerateRequest(count=count), timeout=120)
                    tally.released += len(response.images)
                    tally.latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError:
                    tally.errors += 1

        start = time.monotonic()
        await asyncio.gather(*[caller() for _ in range(callers)])
        tally.seconds += time.monotonic() - start


def _modes(device: str, count: int) -> dict[str, dict[str, str]]:
    per_request = {"FACEGATE_MAX_BATCH": str(count), "FACEGATE_MAX_BATCH_DELAY_MS": "0"}
    if device == "cpu":
        # The default on the CPU: a lane per core (filter.overlap); in_flight_1 is one batch
        # at a time on every core, the default before lanes.
        cross_cpu = {"FACEGATE_MAX_BATCH": "128", "FACEGATE_MAX_BATCH_DELAY_MS": "10"}
        return {
            "per_request": per_request,
            "cross_request_in_flight_1": {**cross_cpu, "FACEGATE_BATCHES_IN_FLIGHT": "1"},
            "cross_request": cross_cpu,
        }
    cross = {"FACEGATE_MAX_BATCH": "512", "FACEGATE_MAX_BATCH_DELAY_MS": "10"}
    return {
        "per_request": {**per_request, "FACEGATE_BATCHES_IN_FLIGHT": "1"},
        "cross_request_in_flight_1": {**cross, "FACEGATE_BATCHES_IN_FLIGHT": "1"},
        "cross_request": {**cross, "FACEGATE_BATCHES_IN_FLIGHT": "2"},
    }


def run(
    callers: int = 16,
    count: int = 8,
    seconds: float = 40.0,
    device: str = "cpu",
    rounds: int = 3,
) -> dict[str, Any]:
    """Each mode's server under `callers` callers for `seconds` in all, in `rounds` turns."""
    with tempfile.TemporaryDirectory(prefix="facegate-bench-") as tmp:
        index = Path(tmp) / "index"
        # Built on the CPU whatever the device it is served on: the GPU gives its verdicts.
        key = os.urandom(32)  # a server refuses to start without a seed key
        (Path(tmp) / "seed.key").write_bytes(key)
        build_demo_index(
            load_dcgan_digiface(MODELS),
            build_embedding_pipeline("sface", MODELS, "cpu"),
            identities=200,
            seed=1,
            seed_key=key,
        ).save(index)
        modes = _modes(device, count)
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        tallies = {mode: _Tally() for mode in modes}
        try:
            for mode, env in modes.items():
                servers[mode] = _start(index, env, Path(tmp) / f"{mode}.log", device)
            # Every server is up at once, idle but for its turn: the modes take turns in
            # each round, so that load that comes and goes on a shared machine weighs on
            # all of them alike (a mode's figures pool its rounds).
            for _ in range(rounds):
                for mode, (_proc, target) in servers.items():
                    asyncio.run(_load(target, callers, count, seconds / rounds, tallies[mode]))
        finally:
            for proc, _target in servers.values():
                proc.terminate()
            for proc, _target in servers.values():
                proc.wait(60)
        rows: dict[str, dict[str, Any]] = {}
        for mode, env in modes.items():
            rows[mode] = tallies[mode].summary()
            emit(
                {
                    "bench": "service_throughput",
                    "device": device,
                    "mode": mode,
                    "callers": callers,
                    "count": count,
                    "seconds": seconds,
                    "rounds": rounds,
                    **env,
                    **rows[mode],
                }
            )
    summary = {
        "service_speedup": round(
            rows["cross_request"]["images_per_s"] / rows["per_request"]["images_per_s"], 2
        ),
        "service_p99_ratio": round(
            rows["cross_request"]["p99_s"] / rows["per_request"]["p99_s"], 2
        ),
    }
    if "cross_request_in_flight_1" in rows:
        summary["service_overlap_speedup"] = round(
            rows["cross_request"]["images_per_s"]
            / rows["cross_request_in_flight_1"]["images_per_s"],
            2,
        )
    emit({"bench": "service_throughput_summary", "device": device, **summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="service throughput on loopback")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--callers", type=int, default=None)
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, 2 callers")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    seconds = args.seconds or (5.0 if args.smoke else 30.0 if gpu else 40.0)
    callers = args.callers or (2 if args.smoke else 64 if gpu else 16)
    count = args.count or (16 if gpu else 8)
    run(
        callers=callers,
        count=count,
        seconds=seconds,
        device=args.device,
        rounds=1 if args.smoke else 3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
