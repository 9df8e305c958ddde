"""`make soak`: a few minutes of mixed, hostile load against a real server on loopback.

    .venv/bin/python -m bench.soak            # SOAK_SECONDS=150 SOAK_CLIENTS=6 by default

The load mixes normal unary and stream calls, cancellations, expired deadlines, abandoned
streams (the reader stops), oversize and malformed requests, and a poison seed whose
candidate makes the generator raise (the one injected fault). At the end it checks:
- the in-flight gauge returns to 0;
- every released image, re-checked by the filter, passes;
- INTERNAL appears only for the poison seed;
and reports memory growth (RSS after warm-up vs at the end). JSON lines; exit 1 if a
check fails.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench.common import MODELS, emit
from service.config import Settings
from service.generators import latents_for, load_dcgan_digiface
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.server import FacegateServer

POISON_SEED = 4242
MAX_COUNT = 8
BOUND_SECONDS = 8.0
ACTIONS = {  # weight
    "unary": 30,
    "stream": 15,
    "cancel": 8,
    "expired_deadline": 8,
    "abandoned_stream": 4,
    "oversize_count": 6,
    "oversize_message": 5,
    "malformed": 8,
    "poison": 4,
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, server: FacegateServer, loop: asyncio.AbstractEventLoop, seconds: float):
        self.server = server
        self.loop = loop
        self.target = f"127.0.0.1:{server.grpc_port}"
        self.seconds = seconds
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.released: list[bytes] = []
        self.abandoned: list[Any] = []
        self.lock = threading.Lock()

    def record(self, action: str, code: grpc.StatusCode, images: Sequence[bytes] = ()) -> None:
        with self.lock:
            self.codes[action][code.name] += 1
            self.released.extend(images)

    def client(self, worker: int, stop_at: float) -> None:
        rng = random.Random(worker)
        names, weights = list(ACTIONS), list(ACTIONS.values())
        with grpc.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            raw = channel.unary_unary("/facegate.v1.GenerationService/Generate")
            while time.monotonic() < stop_at:
                action = rng.choices(names, weights)[0]
                try:
                    self.act(action, rng, stub, raw)
                except grpc.RpcError as err:
                    self.record(action, err.code())

    def act(self, action: str, rng: random.Random, stub: Any, raw: Any) -> None:
        seed = rng.randrange(2**63)
        if action == "unary":
            response = stub.Generate(
                pb.GenerateRequest(count=rng.randint(1, 4), seed=seed), timeout=60
            )
            self.record(action, grpc.StatusCode.OK, [i.data for i in response.images])
        elif action == "stream":
            images = []
            for message in stub.GenerateStream(pb.GenerateRequest(count=3, seed=seed), timeout=60):
                if message.HasField("image"):
                    images.append(message.image.data)
            self.record(action, grpc.StatusCode.OK, images)
        elif action == "cancel":
            future = stub.Generate.future(pb.GenerateRequest(count=4, seed=seed), timeout=60)
            time.sleep(rng.uniform(0.01, 0.3))
            future.cancel()
            try:
                response = future.result()
                self.record(action, grpc.StatusCode.OK, [i.data for i in response.images])
            except grpc.FutureCancelledError:
                self.record(action, grpc.StatusCode.CANCELLED)
        elif action == "expired_deadline":
            timeout = rng.uniform(0.02, 0.4)
            response = stub.Generate(pb.GenerateRequest(count=4, seed=seed), timeout=timeout)
            self.record(action, grpc.StatusCode.OK, [i.data for i in response.images])
        elif action == "abandoned_stream":
            call = stub.GenerateStream(pb.GenerateRequest(count=MAX_COUNT, seed=seed))
            first = next(call)  # then the reader stops; the server's bound ends it
            self.record(action, grpc.StatusCode.OK, [first.image.data] if first.image.data else [])
            with self.lock:
                self.abandoned.append(call)
        elif action == "oversize_count":
            stub.Generate(pb.GenerateRequest(count=MAX_COUNT + rng.randint(1, 10**6)), timeout=10)
        elif action == "oversize_message":
            raw(os.urandom(2 << 20), timeout=10)  # over the server's 1 MiB receive limit
        elif action == "malformed":
            raw(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), timeout=10)
        elif action == "poison":
            stub.Generate(pb.GenerateRequest(count=1, seed=POISON_SEED), timeout=60)
            self.record(action, grpc.StatusCode.OK)

    def inflight(self) -> float:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("facegate_inflight_requests "):
                    return float(line.split()[1])
        return float("nan")


def inject_poison(server: FacegateServer, key: bytes) -> None:
    """The generator raises on the poison seed's first latent: the one fault of the soak.
    The latent is drawn under the live index's salt, as the engine draws it."""
    assert server.loaded is not None
    engine = server.loaded.batcher.engine
    generator = engine.generator
    salt = server.loaded.reloader.live.index.salt
    poison = latents_for(POISON_SEED, 0, 0, generator.latent_dim, key, salt)
    real = generator.generate

    def generate(latents: np.ndarray) -> np.ndarray:
        if any(np.array_equal(row, poison) for row in np.asarray(latents)):
            raise RuntimeError("injected fault: the poison seed's candidate")
        return real(latents)

    generator.generate = generate  # type: ignore[method-assign]


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "150"))
    clients = int(os.environ.get("SOAK_CLIENTS", "6"))
    work = Path(tempfile.mkdtemp(prefix="facegate-soak-"))
    key = os.urandom(32)
    (work / "seed.key").write_bytes(key)
    from filter.assembly import build_embedding_pipeline
    from service.demo import build_demo_index

    pipeline = build_embedding_pipeline("sface", MODELS, device="cpu")
    build_demo_index(
        load_dcgan_digiface(MODELS), pipeline, identities=40, seed=1, seed_key=key
    ).save(work / "index")
    settings = Settings(  # type: ignore[call-arg]
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        index_path=work / "index",
        threshold=0.56,
        models_dir=MODELS,
        device="cpu",
        audit_log=str(work / "audit.jsonl"),
        seed_key_file=work / "seed.key",
        max_count=MAX_COUNT,
        max_request_seconds=BOUND_SECONDS,
        max_batch_delay_ms=10.0,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = FacegateServer(settings)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(300)
    inject_poison(server, key)
    soak = Soak(server, loop, seconds)
    start = time.monotonic()
    threads = [
        threading.Thread(target=soak.client, args=(i, start + seconds)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float]] = []
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - start, rss_mib()))
        time.sleep(5)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    for call in soak.abandoned:
        call.cancel()
    settled_at = time.monotonic()
    while soak.inflight() != 0 and time.monotonic() - settled_at < BOUND_SECONDS + 10:
        time.sleep(0.2)
    inflight_after = soak.inflight()
    settled_seconds = time.monotonic() - settled_at
    # Re-check every released image with the server's own filter (fault removed).
    assert server.loaded is not None
    engine = server.loaded.batcher.engine
    images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in soak.released]
    verdicts = [
        v
        for i in range(0, len(images), 32)
        for v in engine.identity_filter.check(images[i : i + 32])
    ]
    failed_recheck = sum(not v.passed for v in verdicts)
    warm = [rss for t, rss in samples if t >= min(30.0, seconds / 4)] or [samples[-1][1]]
    internal_elsewhere = {
        a: c["INTERNAL"] for a, c in soak.codes.items() if a != "poison" and c["INTERNAL"]
    }
    poison_not_internal = sum(n for code, n in soak.codes["poison"].items() if code != "INTERNAL")
    report = {
        "bench": "soak",
        "seconds": round(elapsed, 1),
        "clients": clients,
        "calls": sum(sum(c.values()) for c in soak.codes.values()),
        "codes": {a: dict(c) for a, c in sorted(soak.codes.items())},
        "released_images": len(images),
        "recheck_failed": failed_recheck,
        "inflight_after": inflight_after,
        "inflight_settled_seconds": round(settled_seconds, 1),
        "rss_mib_after_warmup": round(warm[0], 1),
        "rss_mib_end": round(samples[-1][1], 1),
        "rss_mib_max": round(max(r for _, r in samples), 1),
        "rss_growth_mib": round(samples[-1][1] - warm[0], 1),
        "internal_outside_poison": internal_elsewhere,
        "poison_calls_not_internal": poison_not_internal,
    }
    checks = {
        "inflight_returns_to_0": inflight_after == 0,
        "every_released_image_passes_recheck": failed_recheck == 0 and len(images) > 0,
        "internal_only_where_injected": not internal_elsewhere,
    }
    report["checks"] = checks
    emit(report)
    asyncio.run_coroutine_threadsafe(server.drain(), loop).result(120)
    loop.call_soon_threadsafe(loop.stop)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
