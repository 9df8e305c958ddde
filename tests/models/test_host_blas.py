"""numpy's BLAS on one thread once a pipeline is built (issue 21: its spinning threads
slowed the next batch's detection), with the same bits as on two."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from filter import host_blas
from filter.assembly import build_embedding_pipeline


def _set_threads(count: int) -> None:
    lib = host_blas._numpy_openblas()
    if lib is None:
        pytest.skip("numpy is not built with its bundled OpenBLAS")
    setter = next(getattr(lib, n) for n in host_blas._SETTERS if hasattr(lib, n))
    setter(ctypes.c_int(count))
    assert host_blas.numpy_blas_threads() == count


def test_building_a_pipeline_puts_numpys_blas_on_one_thread(models_dir: Path) -> None:
    _set_threads(2)
    build_embedding_pipeline("sface", models_dir, device="cpu")
    assert host_blas.numpy_blas_threads() == 1


def test_one_blas_thread_gives_the_replica_projection_within_rounding_and_reproducibly() -> None:
    """One thread is what every pipeline computes with, so its bits are the ones that count:
    the same on every call. Against two threads they may differ in the last bits on some
    CPUs' kernels (an AMD EPYC: 4e-7 of the largest value), never by more than float32
    rounding of the sums can."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 48 * 48 * 3)).astype(np.float32)
    basis = rng.standard_normal((64, 48 * 48 * 3)).astype(np.float32)
    try:
        _set_threads(2)
        two = rows @ basis.T
        _set_threads(1)
        one = rows @ basis.T
        again = rows @ basis.T
    finally:
        host_blas.single_threaded_numpy_blas()
    assert np.array_equal(one, again)
    # Rounding, not lost precision: within 1e-5 of the largest value (about 100 float32 ulps;
    # measured 4e-7 where the bits differ), of each other and of the float64 product.
    exact = rows.astype(np.float64) @ basis.T.astype(np.float64)
    tolerance = 1e-5 * np.abs(exact).max()
    assert np.abs(one - two).max() <= tolerance
    assert np.abs(one - exact).max() <= tolerance
