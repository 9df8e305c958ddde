"""SFace as a torch module, read from the pinned ONNX graph: the default embedder on a GPU.

The shipped graph (OpenCV Zoo's `face_recognition_sface_2021dec_int8bq.onnx`, after
`prepare_sface_graph` has dequantised its weights) is one chain of a few operator types:
input scaling (Sub, Mul), Conv, BatchNormalization, PRelu, Dropout, Flatten, Gemm, with
the convolution weights behind Reshape nodes of constants. This module walks that chain
and builds the same layers in torch with the same weights, refusing any graph that is
not such a chain (another model file would fail its sha256 first; this guards the port
against a future pin that changes the graph's shape).

Each BatchNormalization is folded into the convolution before it (OpenCV's DNN module
does the same fusion), which changes only the last bits: embeddings equal the OpenCV
DNN path's within cosine 1 - 1e-6 on the test photos (`tests/models/test_embedders.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

SUPPORTED_OPS = frozenset(
    {"Sub", "Mul", "Conv", "BatchNormalization", "PRelu", "Dropout", "Flatten", "Gemm"}
)


class GraphNotSupported(ValueError):
    """The ONNX graph is not a chain of the operators this port knows."""


class _Affine(nn.Module):
    """(x - shift) * scale with scalars: the graph's input normalisation."""

    def __init__(self, shift: float, scale: float) -> None:
        super().__init__()
        self.shift = shift
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * self.scale


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Every tensor the graph computes from constants alone: initializers, Constant
    nodes, and Reshape of two constants (how the weights reach the Conv nodes)."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Reshape" and all(name in values for name in node.input):
            values[node.output[0]] = values[node.input[0]].reshape(
                [int(d) for d in values[node.input[1]]]
            )
    return values


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fold_batchnorm(conv: nn.Conv2d, node: Any, values: dict[str, np.ndarray]) -> None:
    gamma, beta, mean, var = (values[name].astype(np.float64) for name in node.input[1:5])
    eps = float(_attributes(node).get("epsilon", 1e-5))
    factor = gamma / np.sqrt(var + eps)
    weight = conv.weight.detach().double().numpy() * factor[:, None, None, None]
    bias = beta - mean * factor
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double().numpy() * factor
    conv.weight = nn.Parameter(torch.from_numpy(weight.astype(np.float32)))
    conv.bias = nn.Parameter(torch.from_numpy(bias.astype(np.float32)))


def _batchnorm(node: Any, values: dict[str, np.ndarray], dims: int) -> nn.Module:
    gamma, beta, mean, var = (values[name] for name in node.input[1:5])
    eps = float(_attributes(node).get("epsilon", 1e-5))
    layer: nn.BatchNorm1d | nn.BatchNorm2d = (
        nn.BatchNorm2d(len(gamma), eps=eps) if dims == 4 else nn.BatchNorm1d(len(gamma), eps=eps)
    )
    state = {
        "weight": gamma,
        "bias": beta,
        "running_mean": mean,
        "running_var": var,
    }
    layer.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float32).copy()) for k, v in state.items()}, strict=False
    )
    return layer


def _conv(node: Any, values: dict[str, np.ndarray]) -> nn.Conv2d:
    attrs = _attributes(node)
    weight = values[node.input[1]].astype(np.float32)
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise GraphNotSupported(f"{node.name}: asymmetric padding {pads}")
    groups = int(attrs.get("group", 1))
    conv = nn.Conv2d(
        in_channels=weight.shape[1] * groups,
        out_channels=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=tuple(pads[:2]),
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=groups,
        bias=len(node.input) > 2 and bool(node.input[2]),
    )
    conv.weight = nn.Parameter(torch.from_numpy(weight.copy()))
    if conv.bias is not None:
        conv.bias = nn.Parameter(torch.from_numpy(values[node.input[2]].astype(np.float32).copy()))
    return conv


def _gemm(node: Any, values: dict[str, np.ndarray]) -> nn.Linear:
    attrs = _attributes(node)
    if attrs.get("transA", 0) or not attrs.get("transB", 0):
        raise GraphNotSupported(f"{node.name}: Gemm layout {attrs}")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    weight = values[node.input[1]].astype(np.float32) * alpha
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight = nn.Parameter(torch.from_numpy(weight.copy()))
    linear.bias = nn.Parameter(torch.from_numpy(values[node.input[2]].astype(np.float32) * beta))
    return linear


def _scalar(values: dict[str, np.ndarray], name: str, node: Any) -> float:
    if name not in values or values[name].size != 1:
        raise GraphNotSupported(f"{node.name}: {node.op_type} by a non-scalar")
    return float(values[name].reshape(()))


def build_sface_module(prepared_graph: bytes) -> nn.Module:
    """The torch module computing what the prepared SFace graph computes: (N, 3, 112, 112)
    float RGB 0..255 in, (N, 128) unnormalised embeddings out (eval mode, fp32, CPU)."""
    import onnx

    graph = onnx.load_from_string(prepared_graph).graph
    values = _constants(graph)
    # Constant nodes and Reshape of constants were evaluated above; the rest is the chain.
    chain = [n for n in graph.node if n.output[0] not in values]
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise GraphNotSupported("expected one input and one output")
    current = graph.input[0].name
    layers: list[nn.Module] = []
    dims = 4
    for node in chain:
        if node.op_type not in SUPPORTED_OPS:
            raise GraphNotSupported(f"operator {node.op_type} ({node.name}) is not ported")
        if node.input[0] != current:
            raise GraphNotSupported(f"{node.name} does not continue the chain")
        current = node.output[0]
        if node.op_type == "Sub":
            layers.append(_Affine(_scalar(values, node.input[1], node), 1.0))
        elif node.op_type == "Mul":
            scale = _scalar(values, node.input[1], node)
            last = layers[-1] if layers else None
            if isinstance(last, _Affine) and last.scale == 1.0:
                last.scale = scale
            else:
                layers.append(_Affine(0.0, scale))
        elif node.op_type == "Conv":
            layers.append(_conv(node, values))
        elif node.op_type == "BatchNormalization":
            if isinstance(layers[-1], nn.Conv2d):
                _fold_batchnorm(layers[-1], node, values)
            else:
                layers.append(_batchnorm(node, values, dims))
        elif node.op_type == "PRelu":
            slope = values[node.input[1]].astype(np.float32).reshape(-1)
            prelu = nn.PReLU(len(slope))
            prelu.weight = nn.Parameter(torch.from_numpy(slope.copy()))
            layers.append(prelu)
        elif node.op_type == "Dropout":
            continue  # identity at inference
        elif node.op_type == "Flatten":
            layers.append(nn.Flatten())
            dims = 2
        elif node.op_type == "Gemm":
            layers.append(_gemm(node, values))
    if current != graph.output[0].name:
        raise GraphNotSupported("the chain does not end at the graph's output")
    return nn.Sequential(*layers).eval()
