"""The README's status table over gRPC, on one real server on loopback.

The server starts with its loading held back by the test (UNAVAILABLE while it loads), then
serves with the real models. Tests that need a scripted filter or a counting generator swap
them into the running engine and put the real ones back. Every error seen here is checked
for a membership oracle: no score, no identity id, no word that names one.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service import healthcheck
from service.config import Settings
from service.engine import CandidateEngine
from service.generators import draw_rows
from service.metrics import ServiceMetrics
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.server import LoadedService, load_service
from tests.fakes import CountingGenerator, ScriptedFilter
from tests.servers import InProcessServer, free_port, requests_total, settings_for, wait_until

MAX_ATTEMPTS = 3
LEAKED_SIMILARITY = 0.8765  # what the scripted filter reports: it must never reach a caller
LEAKED = (LEAKED_SIMILARITY, LEAKED_SIMILARITY)  # passed or rejected
ORACLE_WORDS = ("similar", "distance", "score", "cosine", "confidence")


class HeldLoader:
    """load_service, once the test lets it go."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def __call__(self, settings: Settings, metrics: ServiceMetrics) -> LoadedService:
        if not self.go.wait(300):
            raise TimeoutError("the test never let loading go on")
        return load_service(settings, metrics)


class Started:
    def __init__(self, running: InProcessServer, loader: HeldLoader, labels: set[str]) -> None:
        self.running = running
        self.loader = loader
        self.labels = labels  # every identity id in the index
        self.drained = False

    @property
    def engine(self) -> CandidateEngine:
        assert self.running.server.loaded is not None
        return self.running.server.loaded.batcher.engine

    def serving(self) -> InProcessServer:
        self.loader.go.set()
        self.running.started()
        return self.running


@pytest.fixture(scope="module")
def started(demo_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    tmp = tmp_path_factory.mktemp("status")
    loader = HeldLoader()
    # One batch at a time: requests queue while the generator holds a batch (a free lane
    # would take them), so the tests know which candidates share a batch.
    settings = settings_for(
        demo_index, tmp, max_attempts=MAX_ATTEMPTS, max_count=8, max_batch_delay_ms=20.0,
        grace_seconds=1.0, batches_in_flight=1,
    )  # fmt: skip
    running = InProcessServer(settings, loader, wait=False)
    labels = {row["identity"] for row in json.loads((demo_index / "labels.json").read_text())}
    state = Started(running, loader, labels)
    yield state
    loader.go.set()
    if not state.drained:
        running.started()
        running.stop()


@pytest.fixture()
def server(started: Started) -> InProcessServer:
    return started.serving()


@pytest.fixture()
def stub(server: InProcessServer) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def assert_no_oracle(error: grpc.RpcError, labels: set[str]) -> None:
    """Details and trailing metadata name no score, no identity, no word for either."""
    metadata = [(m.key, str(m.value)) for m in (error.trailing_metadata() or ())]  # type: ignore[attr-defined]
    texts = [error.details() or "", *(f"{k}={v}" for k, v in metadata)]
    for text in texts:
        lowered = text.lower()
        assert not any(word in lowered for word in ORACLE_WORDS), text
        assert not re.search(r"\d\.\d\d", text), text  # no score-like number (0.87...)
        assert not any(label in text for label in labels), text
        assert "identity_match" not in lowered and "enrolled" not in lowered, text


@contextmanager
def swapped(
    started: Started,
    checker: ScriptedFilter | None = None,
    max_attempts: int | None = None,
) -> Iterator[CountingGenerator]:
    engine = started.engine
    pipeline = started.running.server.servicer.pipeline
    assert pipeline is not None
    real_filter, real_generator, real_attempts = (
        engine.identity_filter, engine.generator, pipeline.max_attempts
    )  # fmt: skip
    counting = CountingGenerator(real_generator)
    engine.generator = counting  # type: ignore[assignment]
    if checker is not None:
        engine.identity_filter = checker
    if max_attempts is not None:
        pipeline.max_attempts = max_attempts
    try:
        yield counting
    finally:
        counting.gate.set()
        engine.identity_filter, engine.generator = real_filter, real_generator
        pipeline.max_attempts = real_attempts


def _reject_all(started: Started) -> ScriptedFilter:
    return ScriptedFilter(lambda call, position: False, sorted(started.labels)[0], LEAKED)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="facegate.v1.GenerationService")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_unavailable_while_the_models_load(
    started: Started, capsys: pytest.CaptureFixture[str]
) -> None:
    running = started.running
    assert not started.loader.go.is_set(), "this test must see the server before it loads"
    assert _health(running.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for call in (
            stub.Generate,
            lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(pb.GenerateRequest(count=1, seed=1), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "starting" in (info.value.details() or "")
            assert_no_oracle(info.value, started.labels)
    # The container probe says the same: not serving yet, exit 1.
    assert healthcheck.main(["healthcheck", running.target]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    started.serving()
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    assert healthcheck.main(["healthcheck", running.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert healthcheck.main(["healthcheck", f"127.0.0.1:{free_port()}"]) == 1  # nobody there
    assert "unhealthy: UNAVAILABLE" in capsys.readouterr().err


def test_facegate_generate_writes_the_images_or_says_what_the_server_refused(
    server: InProcessServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    out = tmp_path / "out"
    argv = ["generate", "--target", server.target, "--seed", "5", "--out", str(out)]
    assert main([*argv, "--count", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "OK" and report["released"] == 2 and report["seed"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]
    assert [w["path"] for w in report["written"]] == [str(out / "0000.png"), str(out / "0001.png")]
    for path in out.iterdir():
        assert Image.open(path).size == (64, 64)
    refused = tmp_path / "refused"
    assert main([*argv, "--count", "9", "--out", str(refused)]) == 1  # max_count is 8
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "INVALID_ARGUMENT"
    assert "count must be between 1 and 8" in report["message"]
    assert report["written"] == [] and not refused.exists()


def test_nothing_passed_is_failed_precondition_with_counts_in_trailing_metadata(
    started: Started, stub: pb_grpc.GenerationServiceStub
) -> None:
    with swapped(started, _reject_all(started)) as counting, pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(count=2, seed=77), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailing = dict(info.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert trailing["facegate-candidates-drawn"] == str(2 * MAX_ATTEMPTS)
    assert trailing["facegate-slots-unfilled"] == "2"
    assert trailing["facegate-seed"] == "77"
    assert counting.drawn == 2 * MAX_ATTEMPTS  # a request that runs its course draws them all
    assert_no_oracle(info.value, started.labels)


def _assert_stopped_drawing(started: Started, counting: CountingGenerator, count: int) -> None:
    """Once the call is over, the engine draws nothing more for it: two more rounds through
    the batcher would have carried the next round of a request still drawing."""
    running = started.running
    wait_until(lambda: running.server.admission.inflight == 0, "the call to leave")
    drawn = counting.drawn
    assert started.running.server.loaded is not None
    batcher = started.running.server.loaded.batcher
    for _ in range(2):
        running.run(batcher.submit(draw_rows(0, [(0, 0)])))
    assert counting.drawn <= drawn + count + 2  # the round in the engine at the end, the two


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_cancelled_call_is_counted_cancelled_and_stops_drawing(
    started: Started, stub: pb_grpc.GenerationServiceStub, method: str
) -> None:
    count, attempts = 4, 1000
    before = requests_total(started.running.metrics_url, method, "CANCELLED")
    with swapped(started, _reject_all(started), max_attempts=attempts) as counting:
        request = pb.GenerateRequest(count=count, seed=5)
        if method == "Generate":
            call = stub.Generate.future(request)
        else:
            call = stub.GenerateStream(request)
        wait_until(lambda: counting.drawn >= 2 * count, "two rounds of candidates")
        call.cancel()
        _assert_stopped_drawing(started, counting, count)
    assert counting.drawn < count * attempts  # what the call would have drawn to its end
    wait_until(
        lambda: requests_total(started.running.metrics_url, method, "CANCELLED") == before + 1,
        "the call to be counted CANCELLED",
    )


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_the_servers_own_bound_ends_a_call_and_its_drawing(
    started: Started, stub: pb_grpc.GenerationServiceStub, method: str
) -> None:
    """No client deadline: DEADLINE_EXCEEDED can only come from FACEGATE_MAX_REQUEST_SECONDS."""
    count, attempts = 4, 1000
    servicer = started.running.server.servicer
    bound, servicer.max_request_seconds = servicer.max_request_seconds, 2.0
    before = requests_total(started.running.metrics_url, method, "DEADLINE_EXCEEDED")
    try:
        with swapped(started, _reject_all(started), max_attempts=attempts) as counting:
            request = pb.GenerateRequest(count=count, seed=6)
            with pytest.raises(grpc.RpcError) as info:
                if method == "Generate":
                    stub.Generate(request)
                else:
                    list(stub.GenerateStream(request))
            _assert_stopped_drawing(started, counting, count)
    finally:
        servicer.max_request_seconds = bound
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in (info.value.details() or "")
    assert 0 < counting.drawn < count * attempts
    assert requests_total(started.running.metrics_url, method, "DEADLINE_EXCEEDED") == before + 1
    assert_no_oracle(info.value, started.labels)


def test_a_stream_that_fails_after_passed_images_sent_only_those(
    started: Started, stub: pb_grpc.GenerationServiceStub
) -> None:
    """Round 1: slot 0 passes, slots 1 and 2 are rejected; round 2: the filter fails."""

    def script(call: int, position: int) -> bool:
        if call > 0:
            raise RuntimeError("embedder crashed")
        return position == 0

    checker = ScriptedFilter(script, sorted(started.labels)[0], LEAKED)
    received: list[pb.GenerateStreamResponse] = []
    with swapped(started, checker), pytest.raises(grpc.RpcError) as info:
        for message in stub.GenerateStream(pb.GenerateRequest(count=3, seed=8), timeout=60):
            received.append(message)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "no image was released" in (info.value.details() or "")
    assert [m.WhichOneof("event") for m in received] == ["image"]  # no summary either
    assert received[0].image.slot == 0
    pixels = np.asarray(Image.open(io.BytesIO(received[0].image.data)).convert("RGB"))
    assert len(checker.passed) == 1 and np.array_equal(pixels, checker.passed[0])
    assert_no_oracle(info.value, started.labels)


def test_the_same_seed_gives_the_same_pixels_alone_batched_and_after_a_restart(
    started: Started, stub: pb_grpc.GenerationServiceStub
) -> None:
    """Real models, PNG and JPEG. The generator is held while the requests queue, so the
    second batch provably mixes all of them; then a second server from the same settings."""
    assert started.running.server.loaded is not None
    batcher = started.running.server.loaded.batcher
    formats = (pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_JPEG)
    alone = {
        f: stub.Generate(pb.GenerateRequest(count=3, seed=4242, format=f), timeout=120)
        for f in formats
    }
    with swapped(started) as counting:
        counting.gate.clear()
        opener = stub.Generate.future(pb.GenerateRequest(count=1, seed=1), timeout=120)
        assert counting.entered.wait(60), "the opener never reached the generator"
        calls = [
            stub.Generate.future(pb.GenerateRequest(count=3, seed=s, format=f), timeout=120)
            for s in (4242, 9, 4242)
            for f in formats
        ]
        wait_until(lambda: batcher._queue.qsize() == len(calls), "the requests to queue")
        counting.gate.set()
        results = [c.result() for c in calls]
        opener.result()
    assert max(counting.batches) >= 3 * len(calls)  # all six met in one batch
    keys = [(s, f) for s in (4242, 9, 4242) for f in formats]
    for (seed, fmt), result in zip(keys, results, strict=True):
        if seed == 4242:
            assert [i.data for i in result.images] == [i.data for i in alone[fmt].images]
    assert alone[pb.IMAGE_FORMAT_JPEG].images[0].data[:3] == b"\xff\xd8\xff"
    restarted = InProcessServer(started.running.server.settings)
    try:
        with grpc.insecure_channel(restarted.target) as channel:
            again = pb_grpc.GenerationServiceStub(channel)
            for fmt in formats:
                response = again.Generate(
                    pb.GenerateRequest(count=3, seed=4242, format=fmt), timeout=120
                )
                assert [i.data for i in response.images] == [i.data for i in alone[fmt].images]
    finally:
        restarted.stop()


def test_drain_goes_not_serving_and_cuts_a_call_still_running_at_the_grace(
    started: Started, stub: pb_grpc.GenerationServiceStub
) -> None:
    """Last in the module: it drains the shared server (grace 1 s). The scripted filter
    holds a call in flight until after the grace period has run out."""
    running = started.running
    held = threading.Event()
    checker = ScriptedFilter(
        lambda call, position: held.wait(120), sorted(started.labels)[0], LEAKED
    )
    with grpc.insecure_channel(running.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="facegate.v1.GenerationService"), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with swapped(started, checker):
            call = stub.Generate.future(pb.GenerateRequest(count=1, seed=3))  # no deadline
            try:
                assert checker.entered.wait(60), "the call never reached the filter"
                drain = asyncio.run_coroutine_threadsafe(running.server.drain(), running.loop)
                started.drained = True
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Generate(pb.GenerateRequest(count=1), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(grpc.RpcError) as cut:
                    call.result(60)  # the filter is still held: only the grace can end it
            finally:
                held.set()  # let the engine thread go, whatever happened
            drain.result(60)
    assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert len(checker.passed) <= 1 and checker.calls == 1
    running.loop.call_soon_threadsafe(running.loop.stop)
