from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from filter.embedders import FacenetEmbedder, SFaceEmbedder, prepare_sface_graph
from filter.errors import ModelError
from filter.identity_filter import FaceEmbeddingPipeline
from filter.images import decode_image
from filter.models import SFACE
from filter.sface_torch import GraphNotSupported, build_sface_module


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)


def test_sface_embeddings_are_unit_length_and_batch_independent(
    models_dir: Path, crops: np.ndarray
) -> None:
    embedder = SFaceEmbedder(models_dir)
    batch = embedder.embed(crops)
    assert batch.shape == (5, 128) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    single = np.concatenate([embedder.embed(crops[i : i + 1]) for i in range(5)])
    assert np.abs(batch - single).max() < 1e-5
    assert embedder.embed(crops[:0]).shape == (0, 128)


def test_dequantised_graph_matches_the_shipped_int8_graph(
    models_dir: Path, crops: np.ndarray
) -> None:
    raw = (models_dir / SFACE.filename).read_bytes()
    # The shipped graph with only the stale inputs dropped, weights left quantised.
    model = onnx.load_from_string(raw)
    inits = {i.name for i in model.graph.initializer}
    used = {n for node in model.graph.node for n in node.input}
    keep = [i for i in model.graph.input if i.name not in inits and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(model.SerializeToString(), options)
    prepared = ort.InferenceSession(prepare_sface_graph(raw), options)
    x = crops.transpose(0, 3, 1, 2).astype(np.float32)
    expected = np.concatenate(
        [reference.run(None, {"data": x[i : i + 1]})[0] for i in range(len(x))]
    )
    got = prepared.run(None, {"data": x})[0]
    assert np.abs(expected - got).max() < 1e-4


def test_tampered_or_missing_model_is_refused_with_the_setup_command(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="make setup"):
        SFaceEmbedder(tmp_path)
    (tmp_path / SFACE.filename).write_bytes(b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        SFaceEmbedder(tmp_path)


def test_facenet_loads_a_state_dict_in_the_published_format(tmp_path: Path) -> None:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    # The published VGGFace2 file is a plain state dict including the classifier head.
    model = InceptionResnetV1(pretrained=None, classify=True, num_classes=8631)
    weights = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(model.state_dict(), weights)
    embedder = FacenetEmbedder(weights, device="cpu")
    crops = np.random.default_rng(1).integers(0, 256, size=(3, 160, 160, 3), dtype=np.uint8)
    out = embedder.embed(crops)
    assert out.shape == (3, 512)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert embedder.model_sha256 and len(embedder.model_sha256) == 64


def test_facenet_refuses_missing_or_wrong_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing"):
        FacenetEmbedder(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="cannot load facenet weights"):
        FacenetEmbedder(bad)


def test_opencv_and_onnxruntime_backends_agree(models_dir: Path, crops: np.ndarray) -> None:
    opencv = SFaceEmbedder(models_dir, backend="opencv")
    onnx_rt = SFaceEmbedder(models_dir, backend="onnxruntime")
    assert (opencv.backend, onnx_rt.backend) == ("opencv", "onnxruntime")
    assert np.abs(opencv.embed(crops) - onnx_rt.embed(crops)).max() < 1e-4


@pytest.fixture(scope="module")
def photo_crops(faces_dir: Path, pipeline: FaceEmbeddingPipeline) -> np.ndarray:
    """Every face of every test photo, aligned as the filter aligns it."""
    images = [decode_image(path) for path in sorted(faces_dir.rglob("*.jpg"))]
    _, crops = pipeline.aligner.faces(images)
    stacked = np.concatenate(crops)
    assert len(stacked) >= len(images)  # every photo has a face, the group photos more
    return stacked


def test_the_torch_port_equals_opencv_on_the_test_photos(
    models_dir: Path, photo_crops: np.ndarray, crops: np.ndarray
) -> None:
    """The GPU's SFace (the torch port), run here on the CPU, against the CPU's default
    (OpenCV DNN): the same embeddings, so an index built on either serves on the other."""
    opencv = SFaceEmbedder(models_dir, backend="opencv")
    ported = SFaceEmbedder(models_dir, backend="torch")
    assert (opencv.backend, ported.backend) == ("opencv", "torch")
    for batch in (photo_crops, crops):
        cosine = (opencv.embed(batch) * ported.embed(batch)).sum(axis=1)
        assert cosine.min() >= 0.9999, cosine.min()
    one_by_one = np.concatenate([ported.embed(photo_crops[i : i + 1]) for i in range(5)])
    assert np.abs(one_by_one - ported.embed(photo_crops[:5])).max() < 1e-5


def test_the_default_backend_on_the_cpu_is_opencv(models_dir: Path) -> None:
    embedder = SFaceEmbedder(models_dir)
    assert (embedder.backend, embedder.device.type, embedder.precision) == ("opencv", "cpu", "fp32")
    with pytest.raises(ModelError, match="unknown SFace backend"):
        SFaceEmbedder(models_dir, backend="tensorrt")


def test_the_port_refuses_a_graph_it_does_not_know(models_dir: Path) -> None:
    model = onnx.load_from_string(prepare_sface_graph((models_dir / SFACE.filename).read_bytes()))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    conv.op_type = "ConvTranspose"
    with pytest.raises(GraphNotSupported, match="ConvTranspose"):
        build_sface_module(model.SerializeToString())
    model = onnx.load_from_string(prepare_sface_graph((models_dir / SFACE.filename).read_bytes()))
    model.graph.output[0].name = "elsewhere"
    with pytest.raises(GraphNotSupported, match="output"):
        build_sface_module(model.SerializeToString())


def test_onnxruntime_on_cuda_is_asked_for_fp32_without_tf32(
    models_dir: Path, crops: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's CUDA provider has its own TF32 switch. That provider is not installed
    here, so it is reported available and the providers requested are recorded (the
    session itself runs on the CPU provider)."""
    requested: list[object] = []
    real_session = ort.InferenceSession

    def session(graph: bytes, options: object, providers: list[object]) -> object:
        requested.extend(providers)
        return real_session(graph, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    embedder = SFaceEmbedder(models_dir, device="cuda", backend="onnxruntime")
    assert requested[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert embedder.embed(crops).shape == (len(crops), 128)
