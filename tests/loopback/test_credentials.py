"""Content credentials (C2PA): every released image signed, fail closed, verifiable.

The chain comes from the shipped script (deploy/c2pa-test-chain.sh), made once per session
in a temporary folder; the server is real, on loopback, with the session's demo index.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import c2pa
import grpc
import numpy as np
import pytest
from PIL import Image

from filter.decide import ImageVerdict
from filter.identity_filter import StageObserver
from filter.models import DCGAN_DIGIFACE
from filter.thresholds import FilterInForce, Thresholds
from service.batcher import DynamicBatcher
from service.cli import main as cli_main
from service.config import ConfigError, Settings, load_settings
from service.credentials import (
    FILTER_ASSERTION,
    FORBIDDEN_KEY_PARTS,
    TRAINED_ALGORITHMIC_MEDIA,
    C2paContentSigner,
    CredentialsError,
    SigningCredentials,
    manifest_json_of,
)
from service.encoding import ContentSigner
from service.engine import CandidateEngine
from service.errors import SigningFailure
from service.generators import TorchGenerator, load_dcgan_digiface
from service.pipeline import GenerationPipeline, GenerationRequest
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.provenance import ReleaseFacts
from service.reload import SwappableChecker
from service.server import StartupError, main_serve, signing_credentials_for
from tests.conftest import REPO
from tests.servers import InProcessServer, settings_for

CHAIN_SCRIPT = REPO / "deploy" / "c2pa-test-chain.sh"


@pytest.fixture(scope="session")
def c2pa_chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c2pa")
    subprocess.run([str(CHAIN_SCRIPT), str(out)], check=True, capture_output=True)
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _keys(item)


# --- the pipeline, without gRPC ------------------------------------------------------


class PassEverything:
    def check(
        self,
        images: Sequence[np.ndarray],
        observer: StageObserver | None = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        return [
            ImageVerdict(passed=True, reason=None, faces=1, max_similarity=0.1, identity=None)
            for _ in images
        ]


class RecordingSigner:
    """Signs (with a marker) the first `good` images, then raises."""

    def __init__(self, good: int = 1000) -> None:
        self.good = good
        self.facts: list[ReleaseFacts] = []

    def sign(self, data: bytes, media_type: str, facts: ReleaseFacts) -> bytes:
        if len(self.facts) >= self.good:
            raise RuntimeError("HSM unreachable")
        self.facts.append(facts)
        return data + b"SIGNED"


def _in_force(fingerprint: str) -> FilterInForce:
    return FilterInForce(fingerprint, Thresholds(0.5, "override", 0.9, "default"))


@pytest.fixture(scope="module")
def generator(models_dir: Path) -> TorchGenerator:
    return load_dcgan_digiface(models_dir)


def _pipeline(generator: TorchGenerator, checker: Any, signer: ContentSigner) -> GenerationPipeline:
    batcher = DynamicBatcher(CandidateEngine(generator, checker))
    return GenerationPipeline(
        batcher, generator.latent_dim, max_attempts=2, max_count=8, signer=signer
    )


def test_each_image_is_signed_with_its_request_and_the_filter_that_checked_it(
    generator: TorchGenerator,
) -> None:
    checker = SwappableChecker(PassEverything(), _in_force("index-a"))
    signer = RecordingSigner()
    pipeline = _pipeline(generator, checker, signer)

    async def run() -> None:
        first = await pipeline.generate(GenerationRequest(count=2, seed=3, request_id="req-a"))
        checker.swap(PassEverything(), _in_force("index-b"))  # a hot reload between batches
        await pipeline.generate(GenerationRequest(count=1, seed=3, request_id="req-b"))
        assert all(image.data.endswith(b"SIGNED") for image in first.images)
        await pipeline.batcher.close()

    asyncio.run(run())
    assert [(f.request_id, f.filtered_by.index_fingerprint) for f in signer.facts] == [
        ("req-a", "index-a"),
        ("req-a", "index-a"),
        ("req-b", "index-b"),
    ]


def test_a_signing_failure_releases_nothing_and_streams_no_unsigned_image(
    generator: TorchGenerator,
) -> None:
    checker = SwappableChecker(PassEverything(), _in_force("index-a"))
    sent: list[bytes] = []

    async def on_image(image: Any) -> None:
        sent.append(image.data)

    async def run(pipeline: GenerationPipeline, **kw: Any) -> None:
        try:
            await pipeline.generate(GenerationRequest(count=3, seed=5), **kw)
        finally:
            await pipeline.batcher.close()

    with pytest.raises(SigningFailure, match="HSM unreachable"):
        asyncio.run(run(_pipeline(generator, checker, RecordingSigner(good=0))))
    # A stream: the first image was signed and sent; the second fails to sign and is not.
    with pytest.raises(SigningFailure):
        asyncio.run(run(_pipeline(generator, checker, RecordingSigner(good=1)), on_image=on_image))
    assert len(sent) == 1 and sent[0].endswith(b"SIGNED")


def test_a_checker_that_cannot_say_what_checked_the_image_is_not_signed(
    generator: TorchGenerator,
) -> None:
    pipeline = _pipeline(generator, PassEverything(), RecordingSigner())

    async def run() -> None:
        try:
            await pipeline.generate(GenerationRequest(count=1, seed=1))
        finally:
            await pipeline.batcher.close()

    with pytest.raises(SigningFailure, match="unknown"):
        asyncio.run(run())


# --- startup: unusable certificates and keys ----------------------------------------


def _settings(cert: Path, key: Path) -> Settings:
    return Settings(c2pa_cert=cert, c2pa_key=key)  # type: ignore[call-arg]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.mark.parametrize("problem", ["garbage key", "other key", "unreadable key", "CA as signer"])
def test_an_unusable_certificate_or_key_is_refused_naming_the_file(
    c2pa_chain: Path, tmp_path: Path, problem: str
) -> None:
    cert, key = c2pa_chain / "chain.pem", c2pa_chain / "signer.key"
    named = key
    if problem == "garbage key":
        key = tmp_path / "garbage.key"
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        named = key
    elif problem == "other key":
        key = tmp_path / "other.key"
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)
        )
        named = key
    elif problem == "unreadable key":
        key = named = tmp_path / "missing.key"
    else:  # a self-signed CA certificate: no digitalSignature usage, no extended usage
        key, cert = tmp_path / "ca.key", tmp_path / "ca.pem"
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)
        )
        _openssl("req", "-new", "-x509", "-key", str(key), "-subj", "/CN=ca", "-out", str(cert))
        named = cert
    with pytest.raises(StartupError) as info:
        signing_credentials_for(_settings(cert, key))
    assert str(named) in str(info.value), info.value


def test_the_test_chain_loads_and_its_key_is_owner_only(c2pa_chain: Path) -> None:
    credentials = SigningCredentials.load(c2pa_chain / "chain.pem", c2pa_chain / "signer.key")
    assert "UNTRUSTED" in credentials.subject
    assert (c2pa_chain / "signer.key").stat().st_mode & 0o077 == 0


def test_the_server_exits_2_on_a_bad_key_naming_it(
    c2pa_chain: Path, demo_index: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    settings = settings_for(demo_index, tmp_path, c2pa_cert=c2pa_chain / "chain.pem", c2pa_key=bad)
    # In process (a subprocess costs seconds of imports): `facegate serve` returns
    # main_serve's value as its exit status. It resets SIGINT/SIGTERM: put them back.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main_serve(settings) == 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert f"cannot start: FACEGATE_C2PA_KEY {bad}" in caplog.text, caplog.text


def test_cert_and_key_go_together_and_the_info_metric_carries_no_path(c2pa_chain: Path) -> None:
    with pytest.raises(ConfigError, match="FACEGATE_C2PA_CERT and FACEGATE_C2PA_KEY"):
        load_settings(c2pa_cert=c2pa_chain / "chain.pem")
    info = _settings(c2pa_chain / "chain.pem", c2pa_chain / "signer.key").public_info()
    assert info["c2pa_cert"] == info["c2pa_key"] == "set"
    assert info["content_credentials"] == "c2pa"
    assert not any(str(c2pa_chain) in value for value in info.values())


# --- end to end, on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def signing_server(
    demo_index: Path, c2pa_chain: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    tmp = tmp_path_factory.mktemp("signing-server")
    settings = settings_for(
        demo_index,
        tmp,
        c2pa_cert=c2pa_chain / "chain.pem",
        c2pa_key=c2pa_chain / "signer.key",
    )
    running = InProcessServer(settings)
    yield running
    running.stop()


@pytest.fixture()
def stub(signing_server: InProcessServer) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(signing_server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def test_released_images_verify_as_signed_ai_generated_and_filtered(
    signing_server: InProcessServer,
    stub: pb_grpc.GenerationServiceStub,
    c2pa_chain: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caller_id = "caller-chosen-id-7"  # kept in the audit log only, never signed
    png = stub.Generate(
        pb.GenerateRequest(count=2, seed=1), timeout=60, metadata=(("x-request-id", caller_id),)
    )
    assert png.summary.request_id != caller_id
    assert not any(caller_id.encode() in image.data for image in png.images)
    jpeg = stub.Generate(pb.GenerateRequest(count=1, format=pb.IMAGE_FORMAT_JPEG), timeout=60)
    paths = []
    for n, image in enumerate([*png.images, *jpeg.images]):
        path = tmp_path / f"{n}.{image.media_type.split('/')[1]}"
        path.write_bytes(image.data)
        paths.append(path)
    unreadable = tmp_path / "missing.png"
    assert cli_main(["verify", str(paths[0]), str(unreadable), *map(str, paths[1:])]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in (paths[0], unreadable, *paths[1:])]
    assert "error" in lines[1] and lines[1]["manifest"] is None  # the others go on
    assert signing_server.server.loaded is not None
    live = signing_server.server.loaded.reloader.live
    for line, request_id in zip(
        [lines[0], *lines[2:]],
        [png.summary.request_id] * 2 + [jpeg.summary.request_id],
        strict=True,
    ):
        assert line["manifest"] is True and line["signature_valid"] is True, line
        assert line["trust"] == "untrusted"  # the test root is on no trust list
        assert line["ai_generated"] is True
        assert line["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
        assert line["software_agent"] == {"name": "dcgan-digiface"}
        facegate = line["facegate"]
        assert facegate["filter_passed"] is True and facegate["request_id"] == request_id
        assert facegate["index_fingerprint"] == live.fingerprint
        assert facegate["face_match_threshold"] == live.thresholds.identity
        assert facegate["face_match_threshold_source"] == "override"
        assert facegate["generator_model_sha256"] == DCGAN_DIGIFACE.sha256
        assert facegate["replica_threshold"] == live.thresholds.replica
    # The C2PA library itself, with the test root as a trust anchor: trusted.
    anchors = {"trust_anchors": (c2pa_chain / "root.pem").read_text()}
    context = c2pa.Context(
        settings=c2pa.Settings.from_dict({"trust": anchors, "verify": {"verify_trust": True}})
    )
    with c2pa.Reader("image/png", io.BytesIO(png.images[0].data), context=context) as reader:
        assert reader.get_validation_state() == "Trusted"
        labels = [a["label"] for a in (reader.get_active_manifest() or {})["assertions"]]
    assert FILTER_ASSERTION in labels and any(label.startswith("c2pa.actions") for label in labels)


def test_no_key_of_the_manifest_names_a_score_distance_or_identity(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    response = stub.Generate(pb.GenerateRequest(count=1, seed=1), timeout=60)
    store = manifest_json_of(response.images[0].data, "image/png")
    keys = list(_keys(store))
    assert "face_match_threshold" in keys and "index_fingerprint" in keys  # the walk works
    offending = [k for k in keys if any(part in k.lower() for part in FORBIDDEN_KEY_PARTS)]
    assert offending == []


def test_the_same_seed_gives_the_same_pixels_with_signing_on(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    first = stub.Generate(pb.GenerateRequest(count=2, seed=11), timeout=60)
    second = stub.Generate(pb.GenerateRequest(count=2, seed=11), timeout=60)
    for a, b in zip(first.images, second.images, strict=True):
        assert np.array_equal(_pixels(a.data), _pixels(b.data))
        assert a.data != b.data  # each manifest has its own id and signature
    assert not np.array_equal(_pixels(first.images[0].data), _pixels(first.images[1].data))


class FailAfter:
    """Wraps the server's real signer; fails from the (n+1)-th image on."""

    def __init__(self, real: ContentSigner, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def sign(self, data: bytes, media_type: str, facts: ReleaseFacts) -> bytes:
        self.calls += 1
        if self.calls > self.n:
            raise CredentialsError("the signing key vanished")
        return self.real.sign(data, media_type, facts)


def test_a_signing_failure_is_internal_and_releases_nothing_unsigned(
    signing_server: InProcessServer, stub: pb_grpc.GenerationServiceStub
) -> None:
    assert signing_server.server.loaded is not None
    pipeline = signing_server.server.loaded.pipeline
    real = pipeline.signer
    assert real is not None
    try:
        pipeline.signer = FailAfter(real, 0)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(count=2, seed=4), timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details() or ""
        assert details == "content credentials could not be signed; no image was released"
        pipeline.signer = FailAfter(real, 1)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for event in stub.GenerateStream(pb.GenerateRequest(count=3, seed=4), timeout=60):
                received.append(event)
        assert info.value.code() == grpc.StatusCode.INTERNAL
    finally:
        pipeline.signer = real
    # Only the image signed before the failure went out, and it is signed.
    assert len(received) == 1 and received[0].HasField("image")
    assert manifest_json_of(received[0].image.data, "image/png")["active_manifest"]


@pytest.mark.parametrize(("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_a_signed_image_is_accounted_for_by_the_content_rule(
    c2pa_chain: Path, fmt: str, media_type: str
) -> None:
    """facegate's own released images pass `check` and `batch`: the C2PA manifest (PNG
    caBX chunk, JPEG APP11 JUMBF) is read and scanned, not rejected as unchecked."""
    from filter.content import read_content

    credentials = SigningCredentials.load(c2pa_chain / "chain.pem", c2pa_chain / "signer.key")
    signer = C2paContentSigner(credentials, "dcgan-digiface", "0" * 64)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    signed = signer.sign_manifest(buffer.getvalue(), media_type, signer.manifest(None))
    content = read_content(signed)
    assert content.complete, content.unaccounted
    assert [view.name for view in content.views] == ["image"]
