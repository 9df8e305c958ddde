"""The same verdicts on any device: the CUDA floating-point policy is applied wherever the
embedding pipeline is built for a CUDA device, before any model loads, and an index
records the compute that built it. These run on the CPU;
tests/models/test_gpu_agreement.py checks the verdicts themselves on a GPU."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from filter.assembly import EmbeddingSpec, build_embedding_pipeline
from filter.numerics import tf32_enabled


def _for_cuda(monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
    """Without a GPU, CUDA is reported available (the only stand-in); the build then gets
    as far as moving the first model to the device, which fails for want of a driver."""
    if torch.cuda.is_available():
        return nullcontext()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return pytest.raises(RuntimeError)


@pytest.mark.usefixtures("tf32_on")
def test_building_for_cuda_turns_tf32_off_before_any_model_loads(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="filter.numerics"), _for_cuda(monkeypatch):
        build_embedding_pipeline("sface", models_dir, device="cuda")
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert not tf32_enabled()
    assert any("TF32 off" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("tf32_on")
def test_a_ray_actor_spec_for_auto_on_a_gpu_machine_gets_the_policy(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Ray actor runs (EmbeddingSpec.build) with FACEGATE_DEVICE=auto on a machine
    with a GPU: the same builder, so the same policy in the actor's own process."""
    with _for_cuda(monkeypatch):
        EmbeddingSpec("sface", models_dir, device="auto").build()
    assert not tf32_enabled()


@pytest.mark.usefixtures("tf32_on")
def test_the_cpu_leaves_the_process_switches_alone(models_dir: Path) -> None:
    pipeline = build_embedding_pipeline("sface", models_dir, device="cpu")
    assert pipeline.device == torch.device("cpu")
    assert torch.backends.cudnn.allow_tf32 is True  # nothing to do on the CPU


def test_an_index_records_the_compute_that_built_it(full_index: Path) -> None:
    manifest = json.loads((full_index / "manifest.json").read_text())
    assert manifest["compute"] == {
        "detector": {"device": "cpu", "precision": "fp32"},
        "embedder": {"device": "cpu", "backend": "opencv", "precision": "fp32"},
        "cuda_device": None,
        "tf32": False,
        "torch": torch.__version__,
    }
