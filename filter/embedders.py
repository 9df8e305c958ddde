"""Face embedders behind one interface.

`sface` (default, offline): OpenCV Zoo SFace, 128-d, run by OpenCV's DNN module on the
CPU and by a torch port of the same graph on a GPU.
`facenet`: facenet-pytorch InceptionResnetV1 (512-d) with VGGFace2 weights read
from a local path; the production choice where those weights can be baked in.
Both take aligned RGB uint8 crops and return L2-normalised float32 rows.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from filter.errors import ModelError
from filter.models import SFACE, sha256_file, verified_model_path


class Embedder(Protocol):
    name: str
    dim: int
    crop_size: int
    model_sha256: str

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB aligned crops -> (N, dim) float32, unit length."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("FACEGATE_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


def prepare_sface_graph(model_bytes: bytes) -> bytes:
    """Make the shipped SFace graph loadable and fast under onnxruntime.

    As shipped, the graph lists its weights (and some unused tensors) as graph inputs,
    so onnxruntime asks for them ("Required inputs ... are missing"), and its batch
    dimension is fixed at 1. We keep only the real input, make the batch dynamic and
    dequantise the int8 block-quantised weights once, here, instead of on every run:
    the arithmetic is the same (max abs difference ~2e-6) and inference ~1.3x faster.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    used = {name for node in graph.node for name in node.input}
    real_inputs = [i for i in graph.input if i.name not in initializers and i.name in used]
    del graph.input[:]
    graph.input.extend(real_inputs)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"

    constant_dq = [
        node
        for node in graph.node
        if node.op_type == "DequantizeLinear" and all(n in initializers for n in node.input if n)
    ]
    folded = []
    for node in constant_dq:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
        scales = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        zeros = (
            numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scales)
        )
        axis = int(attrs.get("axis", 1))
        block = int(attrs.get("block_size", 0))
        scales, zeros = _broadcast_quant_params(values, scales, zeros, axis, block)
        folded.append(numpy_helper.from_array((values - zeros) * scales, node.output[0]))
    dq_ids = {id(node) for node in constant_dq}
    kept_nodes = [node for node in graph.node if id(node) not in dq_ids]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(folded)
    still_used = {name for node in graph.node for name in node.input}
    kept_inits = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return bytes(model.SerializeToString())


def _broadcast_quant_params(
    values: np.ndarray, scales: np.ndarray, zeros: np.ndarray, axis: int, block: int
) -> tuple[np.ndarray, np.ndarray]:
    if scales.size == 1:
        return scales.reshape(()), zeros.reshape(())
    axis = axis % values.ndim
    if block:
        scales = np.repeat(scales, block, axis=axis)
        zeros = np.repeat(zeros, block, axis=axis)
        index = [slice(None)] * values.ndim
        index[axis] = slice(0, values.shape[axis])
        return scales[tuple(index)], zeros[tuple(index)]
    shape = [1] * values.ndim
    shape[axis] = -1
    return scales.reshape(shape), zeros.reshape(shape)


SFACE_BACKENDS = ("auto", "opencv", "torch", "onnxruntime")


class SFaceEmbedder:
    """SFace. Input RGB 0..255, NCHW, 112x112.

    Backends, all computing the same graph in fp32 (embeddings equal within cosine
    1 - 1e-6; `tests/models/test_embedders.py`):
    - `opencv`: OpenCV's DNN module, on the CPU, in chunks of 16 (its best batch size
      here); about 1.8x onnxruntime's and 2.5x torch's throughput on 2 cores;
    - `torch`: the graph ported to torch (`filter/sface_torch.py`), on the pipeline's
      device; what runs on a GPU;
    - `onnxruntime`: its CPU provider, or its CUDA provider (TF32 off) where installed.
    `auto` (the default) is `torch` on a CUDA device and `opencv` on the CPU.
    """

    name = "sface"
    dim = 128
    crop_size = 112
    precision = "fp32"

    def __init__(
        self, models_dir: Path, device: str = "cpu", threads: int = 0, backend: str = "auto"
    ) -> None:
        if backend not in SFACE_BACKENDS:
            raise ModelError(f"unknown SFace backend {backend!r}; choose one of {SFACE_BACKENDS}")
        path = verified_model_path(models_dir, SFACE)
        self.model_sha256 = SFACE.sha256
        graph = prepare_sface_graph(path.read_bytes())
        self._lock = threading.Lock()
        self._net: Any = None
        self._module: torch.nn.Module | None = None
        torch_device = resolve_device(device)
        if backend == "auto":
            backend = "torch" if torch_device.type == "cuda" else "opencv"
        self.backend = backend
        self.device = torch.device("cpu")
        self.chunk = 16
        if backend == "opencv":
            import cv2

            try:
                self._net = cv2.dnn.readNetFromONNX(np.frombuffer(graph, dtype=np.uint8))
            except cv2.error as exc:
                raise ModelError(f"cannot load SFace model {path}: {exc}") from exc
        elif backend == "torch":
            from filter.sface_torch import GraphNotSupported, build_sface_module

            try:
                module = build_sface_module(graph)
            except GraphNotSupported as exc:
                raise ModelError(f"cannot port SFace model {path} to torch: {exc}") from exc
            self.device = torch_device
            self.chunk = 512 if torch_device.type == "cuda" else 64
            self._module = module.to(torch_device).to(memory_format=torch.channels_last)
        else:
            self._init_onnxruntime(graph, path, torch_device, threads)

    def _init_onnxruntime(
        self, graph: bytes, path: Path, device: torch.device, threads: int
    ) -> None:
        import onnxruntime as ort

        from filter.numerics import ORT_CUDA_PROVIDER_OPTIONS

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", dict(ORT_CUDA_PROVIDER_OPTIONS)))
            self.device = device
        try:
            self._session = ort.InferenceSession(graph, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load SFace model {path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        _check_crops(crops, self.crop_size)
        if self._module is not None:
            return l2_normalise(self._embed_torch(crops))
        batch = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
        if self._net is None:
            (out,) = self._session.run(None, {self._input: batch})
            return l2_normalise(np.asarray(out, dtype=np.float32))
        parts = []
        with self._lock:  # a cv2.dnn.Net is not safe to run from two threads at once
            for start in range(0, len(batch), self.chunk):
                self._net.setInput(batch[start : start + self.chunk])
                parts.append(np.array(self._net.forward(), dtype=np.float32))
        return l2_normalise(np.concatenate(parts))

    def _embed_torch(self, crops: np.ndarray) -> np.ndarray:
        assert self._module is not None
        parts = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(crops), self.chunk):
                pixels = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.chunk]))
                # NHWC uint8 viewed as NCHW: already the channels_last layout the convolutions
                # run fastest in, so the only copy is the upload (and the float conversion).
                batch = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
                parts.append(self._module(batch).float().cpu().numpy())
        return np.concatenate(parts)


class FacenetEmbedder:
    """InceptionResnetV1 (VGGFace2) from a local state-dict file. Input 160x160."""

    name = "facenet"
    dim = 512
    crop_size = 160
    backend = "torch"

    def __init__(self, weights_path: Path, device: str = "cpu", bf16: bool = False) -> None:
        from facenet_pytorch import InceptionResnetV1

        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise ModelError(
                f"facenet weights {weights_path} are missing; set FACEGATE_FACENET_WEIGHTS to "
                "a local copy of 20180402-114759-vggface2.pt"
            )
        self.model_sha256 = sha256_file(weights_path)
        self.device = resolve_device(device)
        model = InceptionResnetV1(pretrained=None, classify=False)
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            # The published file holds the classifier ("logits.*") as well; we embed only.
            state = {k: v for k, v in state.items() if not k.startswith("logits.")}
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ModelError(f"cannot load facenet weights {weights_path}: {exc}") from exc
        self.dtype = torch.bfloat16 if bf16 and self.device.type == "cuda" else torch.float32
        self.precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        self._model = model.to(self.device, dtype=self.dtype).eval()
        self._lock = threading.Lock()

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        _check_crops(crops, self.crop_size)
        batch = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        # facenet-pytorch's fixed_image_standardization
        batch = (batch.permute(0, 3, 1, 2).float() - 127.5) / 128.0
        with self._lock, torch.inference_mode():
            out = self._model(batch.to(self.dtype)).float().cpu().numpy()
        return l2_normalise(out)


def _check_crops(crops: np.ndarray, size: int) -> None:
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(f"expected (N, {size}, {size}, 3) uint8 crops, got {crops.shape}")


def load_embedder(
    name: str, models_dir: Path, device: str = "cpu", facenet_weights: Path | None = None
) -> Embedder:
    if name == "sface":
        return SFaceEmbedder(models_dir, device=device)
    if name == "facenet":
        if facenet_weights is None:
            raise ModelError("the facenet embedder needs FACEGATE_FACENET_WEIGHTS (a local path)")
        return FacenetEmbedder(facenet_weights, device=device, bf16=True)
    raise ModelError(f"unknown embedder {name!r}; choose 'sface' or 'facenet'")
