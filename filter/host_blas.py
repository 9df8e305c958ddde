"""numpy's BLAS on one thread: the host-side products of the filter leave the cores to torch.

numpy ships its own OpenBLAS (scipy-openblas), which after each multi-threaded product
keeps its worker threads spinning for a while. In the filter the only such products are
small (the replica projection of a batch, alignment's 2x2 SVDs), but the spinning threads
then compete with torch's threads for the next batch's detection: on 2 cores (issue 21,
side by side) detection ran about 1.3x slower right after a search than alone. One BLAS
thread removes that and costs nothing on products this small. Whether the results are the
same bits as on two threads depends on the CPU's OpenBLAS kernels: they were on the Xeon
where this was measured; on an AMD EPYC (2026-12-06) products of 16 rows or more differ in
the last bits (4e-7 of the largest value), far below anything a threshold can see.

Process-wide, like the TF32 policy (`filter.numerics`), so it is applied where the
embedding pipeline is built (`filter.assembly.build_embedding_pipeline`). Best effort: a
numpy built against another BLAS is left as it is (and logged).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")


def _numpy_openblas() -> ctypes.CDLL | None:
    import numpy

    bundled = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(bundled.glob("libscipy_openblas*.so*")):
        try:
            return ctypes.CDLL(str(path))  # the copy numpy loaded: dlopen returns it
        except OSError:
            continue
    return None


def numpy_blas_threads() -> int | None:
    """Threads numpy's bundled OpenBLAS uses now, or None if it cannot be told."""
    lib = _numpy_openblas()
    getter = next((getattr(lib, n) for n in _GETTERS if lib and hasattr(lib, n)), None)
    return None if getter is None else int(getter())


def single_threaded_numpy_blas() -> bool:
    """Set numpy's bundled OpenBLAS to one thread; whether it could be done."""
    lib = _numpy_openblas()
    setter = next((getattr(lib, n) for n in _SETTERS if lib and hasattr(lib, n)), None)
    if setter is None:
        log.info("numpy's BLAS is not its bundled OpenBLAS; its threads are left as they are")
        return False
    setter(ctypes.c_int(1))
    done = numpy_blas_threads() == 1
    if done:
        log.info("numpy's OpenBLAS on one thread (host-side products leave the cores to torch)")
    return done
