"""On loopback: every call ends at the server's bound, whatever the client's deadline or
reader does, and is counted; the config info names no file path. Keyed seeds through the
server, with the bounded server as the server of another key."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from filter.identity_filter import FaceEmbeddingPipeline
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.servers import InProcessServer, metric_value, scrape, settings_for

BOUND = 4.0


@pytest.fixture(scope="module")
def bounded(
    demo_index: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("bounded")
    running = InProcessServer(settings_for(demo_index, tmp, max_request_seconds=BOUND))
    yield running
    running.stop()


def _slow_embedder(server: InProcessServer, seconds: float) -> tuple[object, Callable[[], None]]:
    """Every lane's embedder slowed (on the CPU a batch may run in any lane)."""
    assert server.server.loaded is not None
    embedding = server.server.loaded.batcher.engine.identity_filter.embedding  # type: ignore[attr-defined]
    originals = [(embedder, embedder.embed) for embedder in embedding.embedders]

    def slowed(original: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def slow(crops: np.ndarray) -> np.ndarray:
            time.sleep(seconds)
            return original(crops)

        return slow

    for embedder, original in originals:
        embedder.embed = slowed(original)

    def restore() -> None:
        for embedder, original in originals:
            embedder.embed = original

    return embedding, restore


def _requests_total(server: InProcessServer, method: str, code: str) -> float:
    try:
        return metric_value(
            scrape(server.metrics_url), "facegate_requests_total", {"method": method, "code": code}
        )
    except KeyError:
        return 0.0


def _wait_inflight_zero(server: InProcessServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_value(scrape(server.metrics_url), "facegate_inflight_requests") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("facegate_inflight_requests did not return to 0")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_call_without_a_client_deadline_ends_at_the_server_bound(
    bounded: InProcessServer, method: str
) -> None:
    before = _requests_total(bounded, method, "DEADLINE_EXCEEDED")
    _, restore = _slow_embedder(bounded, BOUND + 4.0)
    start = time.monotonic()
    try:
        with grpc.insecure_channel(bounded.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                if method == "Generate":
                    stub.Generate(pb.GenerateRequest(count=2, seed=3))  # no client deadline
                else:
                    list(stub.GenerateStream(pb.GenerateRequest(count=2, seed=3)))
        elapsed = time.monotonic() - start
    finally:
        restore()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert BOUND - 0.5 < elapsed < BOUND + 2.0, elapsed
    assert _requests_total(bounded, method, "DEADLINE_EXCEEDED") == before + 1
    _wait_inflight_zero(bounded)
    assert bounded.server.admission.inflight == 0
    time.sleep(BOUND + 4.0)  # let the injected sleep of the abandoned batch end


def test_an_expired_client_deadline_is_counted_as_deadline_exceeded(
    bounded: InProcessServer,
) -> None:
    before_cancelled = _requests_total(bounded, "Generate", "CANCELLED")
    before = _requests_total(bounded, "Generate", "DEADLINE_EXCEEDED")
    _, restore = _slow_embedder(bounded, 3.0)
    try:
        with (
            grpc.insecure_channel(bounded.target) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            pb_grpc.GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(count=2, seed=3), timeout=1.0
            )
    finally:
        restore()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_inflight_zero(bounded)
    assert _requests_total(bounded, "Generate", "DEADLINE_EXCEEDED") == before + 1
    assert _requests_total(bounded, "Generate", "CANCELLED") == before_cancelled
    time.sleep(3.0)


def test_a_stream_whose_reader_stopped_is_ended_at_the_bound(bounded: InProcessServer) -> None:
    """The client opens a stream of 64 images, reads one and stops: the server's writes block
    on HTTP/2 flow control (about 15 PNGs fit the window), and the call is still ended, and
    its slot freed, at the bound."""
    bounded.server.servicer.max_request_seconds = 600.0
    # The bound must outlast the first round of 64 candidates, whose time depends on the
    # machine's load: measure it on this machine now, then leave ample room.
    with grpc.insecure_channel(bounded.target) as ch:
        start = time.monotonic()
        warm_up = pb_grpc.GenerationServiceStub(ch).GenerateStream(
            pb.GenerateRequest(count=64, seed=11)
        )
        next(warm_up)
        first_round = time.monotonic() - start
        warm_up.cancel()
    give_up = time.monotonic() + 60.0
    while bounded.server.admission.inflight and time.monotonic() < give_up:
        time.sleep(0.05)
    bound = max(15.0, 3.0 * first_round + 5.0)
    bounded.server.servicer.max_request_seconds = bound
    accepted = {"outcome": "accepted"}
    try:
        with grpc.insecure_channel(bounded.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
            start = time.monotonic()
            call = pb_grpc.GenerationServiceStub(ch).GenerateStream(
                pb.GenerateRequest(count=64, seed=11)
            )
            received = [next(call)]  # images flow; then the reader stops
            assert received[0].HasField("image")
            stalled_at = None
            last = -1.0
            while time.monotonic() - start < bound + 5.0:
                text = scrape(bounded.metrics_url)
                if metric_value(text, "facegate_inflight_requests") == 0:
                    break
                now = metric_value(text, "facegate_candidates_total", accepted)
                if now == last and stalled_at is None:
                    stalled_at = time.monotonic() - start
                last = now
                time.sleep(0.5)
            ended = time.monotonic() - start
            with pytest.raises(grpc.RpcError) as info:
                for message in call:
                    received.append(message)
    finally:
        bounded.server.servicer.max_request_seconds = BOUND
    assert stalled_at is not None and stalled_at < bound - 2.0  # blocked, not still working
    assert bound - 1.0 < ended < bound + 3.0, ended
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(received) < 64
    assert bounded.server.admission.inflight == 0


def test_config_info_carries_no_file_paths_and_says_keyed(bounded: InProcessServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = scrape(bounded.metrics_url)
    (info,) = [
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "facegate_config_info"
    ]
    assert info["seeds"] == "keyed" and info["allow_unkeyed_seeds"] == "False"
    assert info["seed_key_file"] == "set" and info["audit_identities"] == "hashed"
    assert info["index_path"] == "set" and info["audit_log"] == "file"
    assert not [v for v in info.values() if "/" in v], info


@pytest.fixture(scope="module")
def keyed(
    models_dir: Path, pipeline: FaceEmbeddingPipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    """`make run`'s demo under another seed key: the index enrols seed 1's candidates
    under that key."""
    tmp = tmp_path_factory.mktemp("keyed")
    key = tmp / "seed.key"
    key.write_bytes(bytes(range(200, 232)))
    build_demo_index(
        load_dcgan_digiface(models_dir), pipeline, identities=40, seed=1, seed_key=key.read_bytes()
    ).save(tmp / "index")
    running = InProcessServer(settings_for(tmp / "index", tmp, seed_key_file=key))
    yield running
    running.stop()


def test_keyed_demo_seed_1_meets_enrolled_faces_and_resamples(
    keyed: InProcessServer, bounded: InProcessServer
) -> None:
    with grpc.insecure_channel(keyed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        first = stub.Generate(pb.GenerateRequest(count=4, seed=1), timeout=60)
        again = stub.Generate(pb.GenerateRequest(count=4, seed=1), timeout=60)
    assert first.summary.candidates_rejected >= 2
    assert any(image.attempts > 1 for image in first.images)
    assert [i.data for i in first.images] == [i.data for i in again.images]
    with grpc.insecure_channel(bounded.target) as channel:  # another key, same seed
        other = pb_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(count=4, seed=1), timeout=60
        )
    assert not {i.data for i in first.images} & {i.data for i in other.images}
    text = scrape(keyed.metrics_url)
    assert metric_value(text, "facegate_config_info", {"seeds": "keyed"}) == 1
