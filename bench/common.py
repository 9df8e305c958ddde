"""Shared helpers for the benchmarks: models, workloads, timing."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("FACEGATE_MODELS_DIR", REPO / "models"))
if not MODELS.is_absolute():
    MODELS = REPO / MODELS


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu x{torch.get_num_threads()} threads ({os.cpu_count()} cores)"


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeat` runs, and the last result."""
    best = float("inf")
    result: Any = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def generated_faces(count: int, seed: int) -> list[np.ndarray]:
    from service.generators import latents_for, load_dcgan_digiface

    generator = load_dcgan_digiface(MODELS)
    latents = np.stack([latents_for(seed, s, 0, generator.latent_dim) for s in range(count)])
    return list(generator.generate(latents))
