"""The same verdicts on any device: the floating-point policy of the filter on a GPU, and
the record of the device and precision an index was built with.

On an Ampere or later GPU, torch by default lets cuDNN convolutions (and, depending on the
version, matrix products) run in TF32, which keeps 10 bits of mantissa instead of 23.
Measured on an H200 (issue 21): with TF32 the default configuration's embeddings of the
same faces fell to cosine 0.498 against the CPU's (a face near a threshold flips), and an
image checked alone or in a batch of 512 differed down to cosine 0.903; with TF32 off,
cosine 1.000 against the CPU, no verdict flips, batch invariance 0.999999, at the same
detection speed. So wherever the filter computes on CUDA, TF32 is off:
- torch's switches are process-wide, so they are set where the embedding pipeline is built
  for a CUDA device (`filter.assembly.build_embedding_pipeline`), which every command, the
  server and each Ray actor go through; the generator in the same process follows them;
- onnxruntime's CUDA provider has its own switch (`ORT_CUDA_PROVIDER_OPTIONS`);
- the search's fp32 rescoring uses no matrix product at all (`filter.vector_table`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from filter.errors import ModelError

log = logging.getLogger(__name__)

# onnxruntime's CUDA provider computes fp32 convolutions and GEMMs in TF32 unless told not
# to; passed wherever that provider is requested.
ORT_CUDA_PROVIDER_OPTIONS = {"use_tf32": "0"}


def tf32_enabled() -> bool:
    """Whether any fp32 CUDA computation of this process may run in TF32 now. A state the
    getters cannot read (torch's old and new switches mixed) counts as enabled."""
    try:
        return bool(
            torch.backends.cuda.matmul.allow_tf32
            or torch.backends.cudnn.allow_tf32
            or torch.get_float32_matmul_precision() != "highest"
        )
    except RuntimeError:
        return True


def apply_device_numerics(device: torch.device) -> None:
    """For a CUDA device, turn TF32 off for this process (cuBLAS matmuls, cuDNN
    convolutions), and log it; nothing for the CPU, which has no TF32. Fails closed: if
    TF32 cannot be turned off, no pipeline is built."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if tf32_enabled():
        raise ModelError(
            "cannot turn TF32 off for this process; the filter on a GPU would not give the "
            "CPU's verdicts (check torch.backends settings made before the filter loads)"
        )
    log.info(
        "CUDA numerics: TF32 off for matrix products and cuDNN convolutions (process-wide, "
        "generator included), so that verdicts on %s match the CPU's",
        device,
    )


def compute_manifest(detector_device: torch.device, embedder: Any) -> dict[str, object]:
    """What an index records of the compute that built it (manifest key "compute"): the
    device and precision of the detector and the embedder, TF32, torch's version. It is a
    record for the operator, never checked at load: an index built on a GPU serves on a
    CPU and the other way round, which is what the policy above is for."""
    embedder_device = torch.device(getattr(embedder, "device", "cpu"))
    cuda = next((d for d in (detector_device, embedder_device) if d.type == "cuda"), None)
    return {
        "detector": {"device": str(detector_device), "precision": "fp32"},
        "embedder": {
            "device": str(embedder_device),
            "backend": str(getattr(embedder, "backend", "torch")),
            "precision": str(getattr(embedder, "precision", "fp32")),
        },
        "cuda_device": None if cuda is None else str(torch.cuda.get_device_name(cuda)),
        "tf32": False if cuda is None else tf32_enabled(),
        "torch": torch.__version__,
    }
