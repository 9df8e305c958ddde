"""The gRPC service end to end on loopback: real server, real channel, real models."""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from filter.faces import DetectorSettings
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.server import main_serve
from tests.conftest import TEST_SEED_KEY
from tests.fakes import CountingGenerator
from tests.servers import (
    DEMO_THRESHOLD,
    InProcessServer,
    SubprocessServer,
    metric_value,
    scrape,
    settings_for,
    wait_until,
)


@pytest.fixture(scope="module")
def server(demo_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("server")
    running = InProcessServer(settings_for(demo_index, tmp, max_count=32))
    yield running
    running.stop()


@pytest.fixture()
def stub(server: InProcessServer) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_happy_path(stub: pb_grpc.GenerationServiceStub) -> None:
    response = stub.Generate(pb.GenerateRequest(count=3), timeout=60)
    assert len(response.images) == 3
    for image in response.images:
        assert image.media_type == "image/png" and image.attempts >= 1
        assert _decode(image.data).shape == (64, 64, 3)
        assert (image.width, image.height) == (64, 64)
    s = response.summary
    assert s.requested == 3 and s.released == 3 and s.slots_unfilled == 0
    assert s.candidates_drawn == sum(i.attempts for i in response.images)
    assert s.candidates_rejected == s.candidates_drawn - 3
    assert len(s.request_id) > 0


def test_seed_reproducibility(stub: pb_grpc.GenerationServiceStub) -> None:
    first = stub.Generate(pb.GenerateRequest(count=4, seed=2024), timeout=60)
    again = stub.Generate(pb.GenerateRequest(count=4, seed=2024), timeout=60)
    other = stub.Generate(pb.GenerateRequest(count=4, seed=2025), timeout=60)
    assert [i.data for i in first.images] == [i.data for i in again.images]
    assert not {i.data for i in first.images} & {i.data for i in other.images}
    unseeded = [stub.Generate(pb.GenerateRequest(count=1), timeout=60) for _ in range(2)]
    assert unseeded[0].images[0].data != unseeded[1].images[0].data
    assert unseeded[0].summary.seed != unseeded[1].summary.seed


def test_jpeg_format(stub: pb_grpc.GenerationServiceStub) -> None:
    response = stub.Generate(pb.GenerateRequest(count=1, format=pb.IMAGE_FORMAT_JPEG), timeout=60)
    assert response.images[0].media_type == "image/jpeg"
    assert response.images[0].data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize(
    ("request_kwargs", "fragment"),
    [
        ({"count": 0}, "count must be between 1 and 32"),
        ({"count": 33}, "count must be between 1 and 32"),
        ({"count": 1, "format": 7}, "unknown image format"),
        ({"count": 1, "jpeg_quality": 101}, "jpeg_quality"),
    ],
)
def test_bad_inputs_are_invalid_argument(
    stub: pb_grpc.GenerationServiceStub, request_kwargs: dict[str, int], fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (info.value.details() or "")


def test_stream_sends_images_then_summary(stub: pb_grpc.GenerationServiceStub) -> None:
    events = list(stub.GenerateStream(pb.GenerateRequest(count=3, seed=7), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["image", "image", "image", "summary"]
    unary = stub.Generate(pb.GenerateRequest(count=3, seed=7), timeout=60)
    streamed = sorted(events[:3], key=lambda e: e.image.slot)
    assert [e.image.data for e in streamed] == [i.data for i in unary.images]
    assert events[-1].summary.released == 3


def test_health_and_reflection(server: InProcessServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "facegate.v1.GenerationService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "facegate.v1.GenerationService" in services
        assert "grpc.health.v1.Health" in services


def test_metrics_are_scraped_over_http(
    server: InProcessServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    """Counters are read before and after this test's own call: the module's earlier calls
    cannot satisfy them."""
    counters: dict[str, tuple[str, dict[str, str]]] = {
        "drawn": ("facegate_candidates_total", {}),
        "ok": ("facegate_requests_total", {"method": "Generate", "code": "OK"}),
        "similarities": ("facegate_similarity_count", {}),
        "generate": ("facegate_generate_seconds_count", {"stage": "generate"}),
        "released": ("facegate_attempts_count", {}),
        **{
            s: ("facegate_filter_seconds_count", {"stage": s})
            for s in ("detect", "embed", "search")
        },
    }

    def read(text: str) -> dict[str, float]:
        values = {}
        for key, (name, labels) in counters.items():
            try:
                values[key] = metric_value(text, name, labels)
            except KeyError:
                values[key] = 0.0
        return values

    before = read(scrape(server.metrics_url))
    response = stub.Generate(pb.GenerateRequest(count=5, seed=99), timeout=60)
    text = scrape(server.metrics_url)
    delta = {key: value - before[key] for key, value in read(text).items()}
    assert delta["drawn"] == response.summary.candidates_drawn
    assert delta["ok"] == 1
    assert delta["released"] == 5  # one attempts observation per released image
    for key in ("similarities", "generate", "detect", "embed", "search"):
        assert delta[key] > 0, key
    for outcome in (
        "accepted",
        "rejected_identity",
        "rejected_replica",
        "rejected_no_face",
        "rejected_too_many_faces",
        "rejected_error",
    ):
        metric_value(text, "facegate_candidates_total", {"outcome": outcome})
    assert metric_value(text, "facegate_threshold") == pytest.approx(DEMO_THRESHOLD)
    assert metric_value(text, "facegate_index_identities") > 0
    assert metric_value(text, "facegate_config_info", {"threshold": str(DEMO_THRESHOLD)}) == 1
    assert metric_value(text, "facegate_build_info", {"embedder": "sface"}) == 1


def test_startup_warns_of_an_index_calibrated_looser_than_the_defaults_unacknowledged(
    demo_index: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload onto it would be refused; a start cannot know what served before (an edit
    or a second looser recalibration keeps such a calibration), so it starts, loudly."""
    from filter.index import FaissIdentityIndex

    loose = tmp_path / "loose"
    FaissIdentityIndex.load(demo_index).with_calibration({"threshold": 0.61}).save(loose)
    with caplog.at_level(logging.WARNING, logger="facegate.server"):
        running = InProcessServer(settings_for(loose, tmp_path, threshold=None))
        running.stop()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "identity threshold 0.4 -> 0.61" in m and "no acknowledgement" in m for m in warned
    ), warned


def test_the_index_calibration_is_in_force_without_an_override(
    demo_index: Path, tmp_path: Path
) -> None:
    from filter.decide import DecisionThresholds
    from filter.index import FaissIdentityIndex
    from filter.index_lineage import acknowledge

    calibrated = tmp_path / "calibrated"
    index = FaissIdentityIndex.load(demo_index).with_calibration(
        {"threshold": 0.61, "replica_threshold": 0.93, "target_false_reject": 0.05}
    )
    # Looser than the defaults (0.40, 0.90): acknowledged, as
    # `calibrate --save --allow-looser` does (see test_startup_warns_...).
    acknowledge(
        index.manifest,
        by="calibrate --save --allow-looser",
        replaces=None,
        before=DecisionThresholds(0.40, 0.90 if index.has_replicas else None),
        after=DecisionThresholds(0.61, 0.93 if index.has_replicas else None),
    )
    index.save(calibrated)
    running = InProcessServer(settings_for(calibrated, tmp_path, threshold=None))
    try:
        text = scrape(running.metrics_url)
    finally:
        running.stop()
    assert metric_value(text, "facegate_threshold") == pytest.approx(0.61)
    assert metric_value(text, "facegate_replica_threshold") == pytest.approx(0.93)
    # The similarity bins are cut at the threshold in force, not at the default.
    assert metric_value(text, "facegate_similarity_bucket", {"le": "0.61"}) == 0


def test_fail_closed_when_the_embedder_raises(
    server: InProcessServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    assert server.server.loaded is not None
    engine = server.server.loaded.batcher.engine
    # Every lane's (on the CPU a batch may run in any lane).
    embedders = engine.identity_filter.embedding.embedders  # type: ignore[attr-defined]

    def explode(crops: np.ndarray) -> np.ndarray:
        raise RuntimeError("embedder crashed")

    originals = [embedder.embed for embedder in embedders]
    for embedder in embedders:
        embedder.embed = explode
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(count=4), timeout=60)
    finally:
        for embedder, original in zip(embedders, originals, strict=True):
            embedder.embed = original
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "no image was released" in (info.value.details() or "")
    assert stub.Generate(pb.GenerateRequest(count=1), timeout=60).images  # recovers


def test_draining_server_answers_unavailable(
    server: InProcessServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    server.server.admission.draining = True
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(count=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.server.admission.draining = False


def test_responses_carry_no_membership_oracle() -> None:
    """No float field, and no field named like a score or identity, anywhere in the API."""
    forbidden = ("similar", "distance", "score", "identity", "confidence", "threshold")
    seen = set()

    def walk(descriptor) -> None:  # type: ignore[no-untyped-def]
        if descriptor.full_name in seen:
            return
        seen.add(descriptor.full_name)
        for field in descriptor.fields:
            assert field.type not in (field.TYPE_FLOAT, field.TYPE_DOUBLE), field.full_name
            assert not any(word in field.name.lower() for word in forbidden), field.full_name
            if field.message_type is not None:
                walk(field.message_type)

    for message in ("GenerateResponse", "GenerateStreamResponse"):
        walk(pb.DESCRIPTOR.message_types_by_name[message])
    assert "facegate.v1.GeneratedImage" in seen and "facegate.v1.GenerateSummary" in seen


def test_audit_log_records_rejections_without_image_data(
    server: InProcessServer,
    stub: pb_grpc.GenerationServiceStub,
    demo_index: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Seed 1 slot k attempt 0 is enrolled in the demo index: the first candidates are rejected.
    response = stub.Generate(pb.GenerateRequest(count=2, seed=1), timeout=60)
    assert response.summary.candidates_rejected >= 1
    audit = Path(server.server.settings.audit_log).read_text().splitlines()
    records = [json.loads(line) for line in audit]
    mine = [r for r in records if r["request_id"] == response.summary.request_id]
    assert len(mine) == response.summary.candidates_rejected
    for record in mine:
        assert set(record) == {
            "time",
            "event",
            "request_id",
            "slot",
            "attempt",
            "reason",
            "similarity",
            "identity",
            "faces",
            "client",
            "caller_request_id",
            "replica_similarity",
        }
        # The demo index's salt is new each session, so which candidates show a face varies:
        # an enrolled candidate whose face the detector misses is still held back, as a
        # replica of its training image (decide's order); a stranger with no face is no_face.
        assert record["reason"] in ("identity_match", "replica", "no_face")
    # Identities are keyed pseudonyms by default (the subkey of the server's seed key),
    # never the labels themselves.
    from service.audit import identity_hasher

    labels = {
        row["identity"]
        for table in ("labels.json", "replica_labels.json")
        for row in json.loads((demo_index / table).read_text())
    }
    pseudonyms = {identity_hasher(TEST_SEED_KEY)(label): label for label in labels}
    matched = [r["identity"] for r in mine if r["reason"] in ("identity_match", "replica")]
    assert matched and all(identity in pseudonyms for identity in matched)
    assert not any(label in line for line in audit for label in labels)
    assert max(len(line) for line in audit) < 1000  # no image data in any line
    # `facegate audit hash` gives an operator the same pseudonym for a label they know.
    from service.cli import main as cli_main

    label = pseudonyms[matched[0]]
    key_file = server.server.settings.seed_key_file
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FACEGATE_SEED_KEY_FILE", str(key_file))
        env.delenv("FACEGATE_AUDIT_KEY_FILE", raising=False)
        assert cli_main(["audit", "hash", label]) == 0
    assert capsys.readouterr().out.strip() == matched[0]


def test_the_server_makes_its_own_request_id_and_keeps_the_callers_in_the_audit_log(
    server: InProcessServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    caller_id = "client-trace:42.a_b-c"
    response = stub.Generate(
        pb.GenerateRequest(count=2, seed=1), timeout=60, metadata=(("x-request-id", caller_id),)
    )
    request_id = response.summary.request_id
    assert request_id != caller_id and len(request_id) == 32 and int(request_id, 16) >= 0
    records = [
        json.loads(line) for line in Path(server.server.settings.audit_log).read_text().splitlines()
    ]
    mine = [r for r in records if r["request_id"] == request_id]
    assert mine and all(r["caller_request_id"] == caller_id for r in mine)
    assert not [r for r in records if r["request_id"] == caller_id]
    for bad in ("has space", "x" * 65, "-leading-dash", 'quote"', "semi;colon"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(
                pb.GenerateRequest(count=1), timeout=30, metadata=(("x-request-id", bad),)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "x-request-id" in (info.value.details() or "")


def test_one_anonymous_peer_cannot_hold_every_slot(server: InProcessServer) -> None:
    """With FACEGATE_MAX_CONCURRENT_PER_PEER=1, a second call from the same address is
    refused at once while the first is held in the generator; the first then completes."""

    assert server.server.loaded is not None
    engine = server.server.loaded.batcher.engine
    admission = server.server.admission
    real, held = engine.generator, CountingGenerator(engine.generator)
    held.gate.clear()
    engine.generator = held  # type: ignore[assignment]
    admission.max_per_peer = 1
    results: dict[str, object] = {}
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def long_call() -> None:
                results["long"] = stub.Generate(pb.GenerateRequest(count=2), timeout=120)

            thread = threading.Thread(target=long_call)
            thread.start()
            try:
                assert held.entered.wait(60), "the long call never reached the generator"
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(pb.GenerateRequest(count=1), timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "this client" in (info.value.details() or "")
                assert admission.inflight == 1 < admission.max_concurrent
            finally:
                held.gate.set()
            thread.join(120)
    finally:
        engine.generator = real
        admission.max_per_peer = 0
    assert len(results["long"].images) == 2  # type: ignore[attr-defined]


def test_concurrency_cap_answers_resource_exhausted_at_once(
    demo_index: Path, tmp_path: Path
) -> None:
    """The long call is held inside the generator until the refusal has come back: the
    refusal provably did not queue behind it."""

    running = InProcessServer(settings_for(demo_index, tmp_path, max_concurrent_requests=1))
    try:
        assert running.server.loaded is not None
        engine = running.server.loaded.batcher.engine
        held = CountingGenerator(engine.generator)
        held.gate.clear()
        engine.generator = held  # type: ignore[assignment]
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            results: dict[str, object] = {}

            def long_call() -> None:
                results["long"] = stub.Generate(pb.GenerateRequest(count=4), timeout=120)

            thread = threading.Thread(target=long_call)
            thread.start()
            try:
                assert held.entered.wait(60), "the long call never reached the generator"
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(pb.GenerateRequest(count=1), timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert thread.is_alive() and held.drawn == 0  # still held: not queued behind it
            finally:
                held.gate.set()
            thread.join(120)
            assert len(results["long"].images) == 4  # type: ignore[attr-defined]
            text = scrape(running.metrics_url)
            assert (
                metric_value(text, "facegate_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == 1
            )
    finally:
        running.stop()


def test_enrolled_released_images_are_held_back_and_the_seed_moves_on(
    demo_index: Path, tmp_path: Path, pipeline: FaceEmbeddingPipeline
) -> None:
    """Enrol what a seed produced, restart on the new index: the live filter holds every one
    of those images back, and the seed itself now maps to new candidates (the new index
    has its own salt), so replaying it says nothing about which faces were enrolled."""
    request = pb.GenerateRequest(count=4, seed=31337)
    first_server = InProcessServer(settings_for(demo_index, tmp_path))
    try:
        with grpc.insecure_channel(first_server.target) as channel:
            first = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    finally:
        first_server.stop()
    assert len(first.images) == 4
    gallery = tmp_path / "gallery"
    for image in first.images:
        folder = gallery / f"released-{image.slot}"
        folder.mkdir(parents=True)
        (folder / "image.png").write_bytes(image.data)
    index, report = build_gallery_index(
        gallery, pipeline, detector_settings=DetectorSettings().as_dict()
    )
    assert report.identities == 4 and not report.no_face
    index.save(tmp_path / "enrolled")

    second_server = InProcessServer(settings_for(tmp_path / "enrolled", tmp_path))
    try:
        with grpc.insecure_channel(second_server.target) as channel:
            second = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
        assert second_server.server.loaded is not None
        live = second_server.server.loaded.batcher.engine.identity_filter
        verdicts = live.check([_decode(image.data) for image in first.images])
    finally:
        second_server.stop()
    assert [(v.passed, str(v.reason)) for v in verdicts] == [(False, "identity_match")] * 4
    assert len(second.images) == 4
    assert not {i.data for i in first.images} & {i.data for i in second.images}


def test_sigterm_drains_in_flight_calls_and_exits_zero(demo_index: Path, tmp_path: Path) -> None:
    proc = SubprocessServer(
        {
            "FACEGATE_INDEX_PATH": str(demo_index),
            "FACEGATE_THRESHOLD": str(DEMO_THRESHOLD),
            "FACEGATE_GRACE_SECONDS": "60",
            "FACEGATE_AUDIT_LOG": "none",
        },
        tmp_path / "server.log",
    )
    try:
        proc.wait_serving()
        results: dict[str, object] = {}
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            def in_flight() -> None:
                try:
                    results["response"] = stub.Generate(pb.GenerateRequest(count=48), timeout=120)
                except grpc.RpcError as err:
                    results["error"] = err

            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="facegate.v1.GenerationService"), timeout=60
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            thread = threading.Thread(target=in_flight)
            thread.start()
            wait_until(
                lambda: metric_value(scrape(proc.metrics_url), "facegate_inflight_requests") >= 1,
                "the call to be in flight",
            )
            proc.terminate()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would itself hold the drain for its grace period
            # Still in flight after the drain began: the call provably spans the signal.
            assert metric_value(scrape(proc.metrics_url), "facegate_inflight_requests") >= 1
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(count=1), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            thread.join(120)
        assert "error" not in results, results.get("error")
        assert len(results["response"].images) == 48  # type: ignore[attr-defined]
        assert proc.wait(60) == 0
        log = proc.log()
        assert "draining" in log and "stopped" in log
    finally:
        proc.kill()


def test_missing_index_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    proc = SubprocessServer({"FACEGATE_INDEX_PATH": str(tmp_path / "no-index")}, tmp_path / "s.log")
    try:
        assert proc.wait(120) == 2
        assert "no identity index" in proc.log() and "facegate index build" in proc.log()
    finally:
        proc.kill()


def test_invalid_setting_stops_startup_naming_the_variable(tmp_path: Path) -> None:
    proc = SubprocessServer({"FACEGATE_MAX_ATTEMPTS": "zero"}, tmp_path / "s.log")
    try:
        assert proc.wait(120) == 2
        assert "FACEGATE_MAX_ATTEMPTS" in proc.log()
    finally:
        proc.kill()


def test_tls_server_serves_a_verified_client(demo_index: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    running = InProcessServer(settings_for(demo_index, tmp_path, tls_cert=cert, tls_key=key))
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        target = f"localhost:{running.server.grpc_port}"
        with grpc.secure_channel(target, credentials) as channel:
            response = pb_grpc.GenerationServiceStub(channel).Generate(
                pb.GenerateRequest(count=1, seed=5), timeout=60
            )
        assert len(response.images) == 1
        with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError) as info:
            pb_grpc.GenerationServiceStub(plain).Generate(pb.GenerateRequest(count=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


# A build that loaded the damaged index would serve on: the timeout turns that into a failure.
@pytest.mark.timeout(180)
@pytest.mark.parametrize("damage", ["truncated", "same_size"])
def test_a_corrupt_index_stops_startup_with_exit_2_naming_the_file(
    demo_index: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    index = tmp_path / "index"
    shutil.copytree(demo_index, index)
    vectors = index / "vectors.faiss"
    data = bytearray(vectors.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # same size, one byte of a vector changed: only the hash can tell
        data[-7] ^= 0x40
    vectors.write_bytes(bytes(data))
    # In process (a subprocess costs seconds of imports); main_serve resets SIGINT/SIGTERM.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level(logging.ERROR):
            assert main_serve(settings_for(index, tmp_path)) == 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert "vectors.faiss" in caplog.text, caplog.text
    assert "Traceback" not in caplog.text
