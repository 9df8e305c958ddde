"""Property-based fuzzing (issue 9 §6): image decoding, index loading and request fields.
Nothing crashes the process; every case gets a clear error or a reject."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from filter.errors import FilterError, IdentityIndexError, ImageError
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.models import sha256_file
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import REPO
from tests.servers import InProcessServer, settings_for

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


SAMPLES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")}


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """Byte flips, a truncation, an insertion: the classic file-format mutations."""
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(max_size=64))
    return bytes(data)


def _assert_decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data)
    except ImageError as exc:
        assert str(exc)  # a clear message
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(data: bytes) -> None:
    _assert_decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)).flatmap(lambda fmt: mutated(SAMPLES[fmt])))
def test_mutated_png_jpeg_gif_webp_decode_or_raise_image_error(data: bytes) -> None:
    _assert_decodes_or_refuses(data)


def _container_samples() -> dict[str, bytes]:
    """Files with the structures the content rule walks: thumbnails, frames, pages,
    metadata (issue 19); small, so that mutations hit the structure."""
    from tests.content_probes import hiding_places

    rng = np.random.default_rng(1)
    shown = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    hidden = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    return {place: build(shown, hidden) for place, build in hiding_places((12, 10)).items()}


CONTAINERS = _container_samples()


@FUZZ
@given(st.sampled_from(sorted(CONTAINERS)).flatmap(lambda name: mutated(CONTAINERS[name])))
def test_mutated_containers_are_read_or_refused_never_crash(data: bytes) -> None:
    """The content rule on hostile structure: an ImageError (unreadable), or its images and
    what it could not account for; never another exception."""
    from filter.content import checked_pixels_png, read_content

    try:
        content = read_content(data)
    except ImageError as exc:
        assert str(exc)
        return
    assert content.views and content.frames >= 1
    assert np.array_equal(content.views[0].pixels, decode_image(data))
    if content.complete:
        assert checked_pixels_png(content).startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def small_index(demo_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "index"
    shutil.copytree(demo_index, out)
    return out


def _mutated_copy(source: Path, target: Path, name: str, data: bytes, rehash: bool) -> None:
    shutil.copytree(source, target)
    (target / name).write_bytes(data)
    if rehash and name != "manifest.json":
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["files"][name]["sha256"] = sha256_file(target / name)
        manifest["files"][name]["bytes"] = len(data)
        (target / "manifest.json").write_text(json.dumps(manifest))


def _load_or_refuse(folder: Path) -> None:
    try:
        FaissIdentityIndex.load(folder)
    except IdentityIndexError as exc:
        assert str(exc)


@FUZZ
@given(data=st.data())
def test_mutated_manifest_and_labels_load_or_raise_index_errors(
    small_index: Path, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(["manifest.json", "labels.json"]))
    original = (small_index / name).read_bytes()
    mutation = data.draw(mutated(original))
    rehash = data.draw(st.booleans())  # an attacker who can write the folder can rehash
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        _mutated_copy(small_index, folder, name, mutation, rehash)
        _load_or_refuse(folder)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), JSON_VALUES))
def test_arbitrary_json_manifests_are_refused(
    small_index: Path, manifest: dict[str, object]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        _mutated_copy(small_index, folder, "manifest.json", json.dumps(manifest).encode(), False)
        with pytest.raises(IdentityIndexError):
            FaissIdentityIndex.load(folder)


FAISS_FUZZ = """
import json, shutil, sys, tempfile
from pathlib import Path
from hypothesis import given, settings, strategies as st
from filter.errors import IdentityIndexError
from filter.index import FaissIdentityIndex
from tests.loopback.test_fuzz import _mutated_copy, mutated

source = Path(sys.argv[1])
original = (source / "vectors.faiss").read_bytes()
outcomes = {"loaded": 0, "refused": 0}

@settings(max_examples=int(sys.argv[2]), deadline=None, database=None)
@given(mutated(original), st.booleans())
def run(data, rehash):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        _mutated_copy(source, folder, "vectors.faiss", data, rehash)
        try:
            FaissIdentityIndex.load(folder)
            outcomes["loaded"] += 1
        except IdentityIndexError:
            outcomes["refused"] += 1

run()
print(json.dumps(outcomes))
"""


def test_mutated_faiss_bytes_never_crash_the_process(small_index: Path) -> None:
    """FAISS parses in C++: a crash would kill the process, so the fuzz runs in a child
    and the test checks that it exits normally."""
    assert (small_index / "vectors.faiss").is_file()
    result = subprocess.run(
        [sys.executable, "-c", FAISS_FUZZ, str(small_index), "150"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] > 0


@pytest.fixture(scope="module")
def fuzz_server(demo_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz-server")
    running = InProcessServer(settings_for(demo_index, tmp, max_count=2, max_attempts=2))
    yield running.target
    running.stop()


ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 2**32 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    image_format=st.integers(-(2**31), 2**31 - 1),
    jpeg_quality=st.integers(0, 2**32 - 1),
)
def test_request_fields_get_a_result_or_a_clear_error(
    fuzz_server: str, count: int, seed: int | None, image_format: int, jpeg_quality: int
) -> None:
    request = pb.GenerateRequest(count=count, jpeg_quality=jpeg_quality)
    request.format = image_format  # type: ignore[assignment]  # open enum: any int32
    if seed is not None:
        request.seed = seed
    with grpc.insecure_channel(fuzz_server) as channel:
        try:
            response = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
        except grpc.RpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())
            assert err.details()
            return
    assert 1 <= len(response.images) <= 2


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=256))
def test_malformed_request_bytes_are_invalid_argument(fuzz_server: str, raw: bytes) -> None:
    with grpc.insecure_channel(fuzz_server) as channel:
        call = channel.unary_unary(
            "/facegate.v1.GenerationService/Generate",
            request_serializer=None,
            response_deserializer=None,
        )
        try:
            call(raw, timeout=60)
        except grpc.RpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())


def test_filter_errors_are_the_refusal_type() -> None:
    assert issubclass(ImageError, FilterError) and issubclass(IdentityIndexError, FilterError)
