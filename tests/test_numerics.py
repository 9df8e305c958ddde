"""The same verdicts on any device: the CUDA floating-point policy is applied wherever the
embedding pipeline is built for a CUDA device, before any model loads, and an index
records the compute that built it. These run on the CPU; tests/test_gpu_agreement.py
checks the verdicts themselves on a GPU."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from filter import numerics
from filter.assembly import EmbeddingSpec, build_embedding_pipeline
from filter.errors import ModelError
from filter.numerics import apply_device_numerics, tf32_enabled


@pytest.fixture()
def tf32_on() -> Iterator[None]:
    """TF32 allowed everywhere (torch's default for cuDNN on a GPU), restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    assert tf32_enabled()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


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


@pytest.mark.usefixtures("tf32_on")
def test_tf32_that_stays_on_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numerics, "tf32_enabled", lambda: True)
    with pytest.raises(ModelError, match="cannot turn TF32 off"):
        apply_device_numerics(torch.device("cuda"))


@pytest.mark.usefixtures("tf32_on")
def test_switches_set_through_torchs_newer_api_are_turned_off_too() -> None:
    """A library that set torch's newer per-operator switches leaves the older ones
    unreadable (torch raises on reading them): counted as TF32 on, then turned off."""
    backends: Any = torch.backends
    switches = (backends.cudnn.conv, backends.cudnn.rnn, backends.cuda.matmul)
    for switch in switches:
        switch.fp32_precision = "ieee"
    try:
        with pytest.raises(RuntimeError):
            _ = torch.backends.cudnn.allow_tf32
        assert tf32_enabled()  # unreadable, so counted as enabled
        apply_device_numerics(torch.device("cuda"))
        assert not tf32_enabled()
    finally:
        for switch in switches:
            switch.fp32_precision = "none"


def test_an_index_records_the_compute_that_built_it(full_index: Path) -> None:
    manifest = json.loads((full_index / "manifest.json").read_text())
    assert manifest["compute"] == {
        "detector": {"device": "cpu", "precision": "fp32"},
        "embedder": {"device": "cpu", "backend": "opencv", "precision": "fp32"},
        "cuda_device": None,
        "tf32": False,
        "torch": torch.__version__,
    }
