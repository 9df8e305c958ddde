"""The TF32 policy without a model: a switch that stays on stops the build, and switches
set through torch's newer per-operator API are turned off too."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from filter import numerics
from filter.errors import ModelError
from filter.numerics import apply_device_numerics, tf32_enabled


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
