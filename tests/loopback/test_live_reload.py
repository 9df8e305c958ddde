"""Hot index reload and shadow thresholds on a real server on loopback.

Two indexes tell apart what is filtered: `photos` (test photos of three people) and
`demo` (the first candidate of slots 0..7 of seed 1, enrolled as training faces, saved
with a calibration). A request with seed 1 meets enrolled faces at every slot's first
attempt under `demo` only, so every image it releases needed at least two attempts.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from filter.decide import DecisionThresholds
from filter.faces import DetectorSettings
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex
from filter.index_lineage import acknowledge
from service.config import Settings
from service.demo import build_demo_index
from service.generators import load_dcgan_digiface
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import REPO, TEST_SEED_KEY, make_gallery, write_seed_key
from tests.servers import InProcessServer, SubprocessServer, metric_value, scrape

DEMO_CALIBRATION = {"threshold": 0.56, "replica_threshold": 0.9}


@pytest.fixture(scope="module")
def releases(
    tmp_path_factory: pytest.TempPathFactory,
    identities_dir: Path,
    models_dir: Path,
    pipeline: FaceEmbeddingPipeline,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    gallery = make_gallery(identities_dir, root / "gallery", ["id01", "id02", "id03"])
    photos, _ = build_gallery_index(
        gallery, pipeline, detector_settings=DetectorSettings().as_dict()
    )
    photos.save(root / "photos")
    demo = build_demo_index(
        load_dcgan_digiface(models_dir), pipeline, identities=8, seed=1, seed_key=TEST_SEED_KEY
    )
    calibrated = demo.with_calibration(DEMO_CALIBRATION)
    calibrated.save(root / "loose")  # 0.56 is looser than the photos' default 0.40
    # The same index, published with an acknowledgement that it may be looser.
    acknowledge(
        calibrated.manifest,
        by="index publish --allow-looser",
        replaces=photos.fingerprint,
        before=DecisionThresholds(0.40),
        after=DecisionThresholds(0.56),
    )
    calibrated.save(root / "demo")
    broken = shutil.copytree(root / "photos", root / "broken")
    vectors = bytearray((broken / "vectors.faiss").read_bytes())
    vectors[-5] ^= 0xFF  # same size, other content: the manifest's sha256 no longer holds
    (broken / "vectors.faiss").write_bytes(bytes(vectors))
    return {
        "photos": root / "photos",
        "demo": root / "demo",
        "loose": root / "loose",
        "broken": broken,
    }


def point(link: Path, target: Path) -> None:
    """Flip `link` to `target` atomically, as an operator (or Kubernetes) does."""
    staging = link.with_name(link.name + ".new")
    staging.symlink_to(target)
    os.replace(staging, link)


def fingerprint(path: Path) -> str:
    return FaissIdentityIndex.load(path).fingerprint


def live_fingerprint(metrics_url: str) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(scrape(metrics_url)):
        for sample in family.samples:
            if sample.name == "facegate_index_info":
                return str(sample.labels["fingerprint"])
    raise KeyError("facegate_index_info")


def wait_for(condition: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met")


def all_resampled(stub: pb_grpc.GenerationServiceStub) -> bool:
    """Whether every slot of a seed-1 request had its first candidate rejected."""
    response = stub.Generate(pb.GenerateRequest(count=4, seed=1), timeout=120)
    assert response.summary.released >= 1
    return all(image.attempts >= 2 for image in response.images)


def test_sighup_swaps_the_index_and_a_broken_one_is_refused(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    link = tmp_path / "current"
    link.symlink_to(releases["photos"])
    server = SubprocessServer(
        {
            "FACEGATE_INDEX_PATH": str(link),
            "FACEGATE_DEVICE": "cpu",
            "FACEGATE_TORCH_THREADS": "1",
            "FACEGATE_AUDIT_LOG": "none",
            "FACEGATE_MAX_COUNT": "8",
        },
        tmp_path / "server.log",
    )
    try:
        server.wait_serving()
        url = server.metrics_url

        def reloads(result: str) -> float:
            return metric_value(scrape(url), "facegate_index_reloads_total", {"result": result})

        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            assert live_fingerprint(url) == fingerprint(releases["photos"])
            assert metric_value(scrape(url), "facegate_threshold") == pytest.approx(0.40)
            assert not all_resampled(stub)
            loaded_at = metric_value(scrape(url), "facegate_index_last_reload_timestamp_seconds")

            # Calls keep flowing while the index is swapped; none of them may fail.
            failures: list[BaseException] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    try:
                        stub.Generate(pb.GenerateRequest(count=2), timeout=120)
                    except grpc.RpcError as err:
                        failures.append(err)

            # Looser thresholds without an acknowledgement: refused, counted, logged.
            point(link, releases["loose"])
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: reloads("refused_looser") == 1)
            assert live_fingerprint(url) == fingerprint(releases["photos"])
            assert metric_value(scrape(url), "facegate_threshold") == pytest.approx(0.40)

            worker = threading.Thread(target=traffic)
            worker.start()
            try:
                point(link, releases["demo"])  # the same, acknowledged
                server.proc.send_signal(signal.SIGHUP)
                wait_for(lambda: reloads("success") == 1)
            finally:
                stop.set()
                worker.join(120)
            assert failures == []
            assert server.proc.poll() is None  # SIGHUP no longer kills the server
            assert live_fingerprint(url) == fingerprint(releases["demo"])
            # The calibration saved with the new index is in force (no override was set).
            assert metric_value(scrape(url), "facegate_threshold") == pytest.approx(0.56)
            assert (
                metric_value(scrape(url), "facegate_index_last_reload_timestamp_seconds")
                > loaded_at
            )
            assert all_resampled(stub)

            point(link, releases["broken"])
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: reloads("failure") == 1)
            assert reloads("success") == 1
            assert live_fingerprint(url) == fingerprint(releases["demo"])
            assert all_resampled(stub)  # the old index keeps filtering
        log = server.log()
        assert "refused; still serving index" in log and "sha256" in log
        assert "identity threshold 0.4 -> 0.56" in log and "no acknowledgement" in log
        assert "acknowledged by `index publish --allow-looser`" in log
        # 0.56 is above SFace's measured same-person floor: said at the reload.
        assert "above 0.5, the lowest same-person similarity" in log
    finally:
        server.kill()


def _settings(index: Path, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "index_path": index,
        "models_dir": REPO / "models",
        "device": "cpu",
        "audit_log": "none",
        "grace_seconds": 5.0,
        "max_count": 8,
        "seed_key_file": write_seed_key(tmp_path),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture()
def watched(releases: dict[str, Path], tmp_path: Path) -> Iterator[tuple[InProcessServer, Path]]:
    link = tmp_path / "current"
    link.symlink_to(releases["demo"])
    # Shadow identity threshold -1: the shadow would reject every image with a face.
    running = InProcessServer(
        _settings(link, tmp_path, index_watch_seconds=0.2, shadow_threshold=-1.0)
    )
    yield running, link
    running.stop()


def test_shadow_threshold_counts_what_it_would_change_without_acting(
    watched: tuple[InProcessServer, Path],
) -> None:
    server, _ = watched
    url = server.metrics_url

    def counts() -> dict[str, float]:
        text = scrape(url)
        out = {
            change: metric_value(text, "facegate_shadow_candidates_total", {"change": change})
            for change in ("same", "would_reject", "would_pass")
        }
        out["accepted"] = metric_value(text, "facegate_candidates_total", {"outcome": "accepted"})
        out["all"] = metric_value(text, "facegate_candidates_total")
        return out

    before = counts()
    with grpc.insecure_channel(server.target) as channel:
        response = pb_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(count=4, seed=1), timeout=120
        )
    after = counts()
    delta = {k: after[k] - before[k] for k in after}
    assert response.summary.released >= 1  # the shadow rejected them all; nothing changed
    assert delta["would_reject"] == delta["accepted"] == response.summary.released
    assert delta["same"] == response.summary.candidates_rejected
    assert delta["would_pass"] == 0
    text = scrape(url)
    assert metric_value(text, "facegate_shadow_threshold", {"signal": "identity"}) == -1.0
    assert metric_value(text, "facegate_threshold") == pytest.approx(0.56)  # in force: unchanged


def test_file_watch_reloads_when_the_link_flips(
    watched: tuple[InProcessServer, Path], releases: dict[str, Path]
) -> None:
    server, link = watched
    url = server.metrics_url
    assert live_fingerprint(url) == fingerprint(releases["demo"])
    point(link, releases["broken"])
    wait_for(
        lambda: (
            metric_value(scrape(url), "facegate_index_reloads_total", {"result": "failure"}) == 1
        )
    )
    assert live_fingerprint(url) == fingerprint(releases["demo"])
    point(link, releases["photos"])
    wait_for(lambda: live_fingerprint(url) == fingerprint(releases["photos"]))
    text = scrape(url)
    assert metric_value(text, "facegate_index_reloads_total", {"result": "success"}) == 1
    assert metric_value(text, "facegate_threshold") == pytest.approx(0.40)  # no calibration
    # The shadow follows the new thresholds in force.
    assert metric_value(text, "facegate_shadow_threshold", {"signal": "identity"}) == -1.0
