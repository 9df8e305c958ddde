"""A flat FAISS file's header is checked against its size before FAISS reads it: files
FAISS writes pass, whatever the metric; a header that claims anything else is refused."""

from __future__ import annotations

import struct
from pathlib import Path

import faiss
import numpy as np
import pytest

from filter.errors import IndexCorruptError
from filter.faiss_layout import FLAT_PREFIX_BYTES, check_flat_layout

PATH = Path("index/vectors.faiss")
NTOTAL_AT = 8  # after the fourcc and d (int32)
DIM_AT = 4


def _flat(metric: int, vectors: int = 3, dim: int = 4) -> bytes:
    index = faiss.IndexFlat(dim, metric)
    if vectors:
        index.add(np.ones((vectors, dim), np.float32))
    return bytes(faiss.serialize_index(index))


def _check(data: bytes, size: int | None = None) -> None:
    check_flat_layout(data[:FLAT_PREFIX_BYTES], len(data) if size is None else size, PATH)


@pytest.mark.parametrize(
    "metric",
    [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2, faiss.METRIC_L1, faiss.METRIC_Lp],
)
@pytest.mark.parametrize("vectors", [0, 1, 3])
@pytest.mark.parametrize("dim", [1, 4])
def test_files_faiss_writes_pass_whatever_the_metric(metric: int, vectors: int, dim: int) -> None:
    """L1 and Lp headers carry a metric argument: the length sits 4 bytes later."""
    _check(_flat(metric, vectors, dim))


def test_other_layouts_are_left_to_faiss() -> None:
    hnsw = faiss.IndexHNSWFlat(4, 8)
    check_flat_layout(bytes(faiss.serialize_index(hnsw))[:FLAT_PREFIX_BYTES], 1, PATH)


def _with(data: bytes, at: int, fmt: str, value: int) -> bytes:
    changed = bytearray(data)
    struct.pack_into(fmt, changed, at, value)
    return bytes(changed)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: d[:-1], "a byte short"),
        (lambda d: d + b"\0", "a byte long"),
        (lambda d: _with(d, NTOTAL_AT, "<q", 4), "more vectors than values"),
        # Signs that cancel: -4 x -3 is the 12 values the file holds.
        (lambda d: _with(_with(d, DIM_AT, "<i", -4), NTOTAL_AT, "<q", -3), "negative sizes"),
        (lambda d: _with(d, 37, "<Q", 1 << 28), "a length over the file"),
    ],
)
def test_a_header_that_disagrees_with_the_file_is_refused_naming_it(make: object, why: str) -> None:
    data = make(_flat(faiss.METRIC_INNER_PRODUCT))  # type: ignore[operator]
    with pytest.raises(IndexCorruptError, match=f"cannot read {PATH}: its header claims"):
        _check(data)


def test_an_empty_file_of_no_dimension_is_refused() -> None:
    """0 vectors of dimension 0: 0 values, the size right, and still no index."""
    with pytest.raises(IndexCorruptError, match="dimension 0"):
        _check(_with(_flat(faiss.METRIC_INNER_PRODUCT, vectors=0), DIM_AT, "<i", 0))


def test_the_metric_argument_is_skipped_only_where_it_is_written() -> None:
    """An IP header read as if it had a metric argument (or an L1 header as if it had
    none) finds its length 4 bytes off: refused, not read as another length."""
    l1 = _flat(faiss.METRIC_L1)
    _with_ip_metric = _with(l1, 33, "<i", faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(IndexCorruptError, match="its header claims"):
        _check(_with_ip_metric)
    ip = _flat(faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(IndexCorruptError, match="its header claims"):
        _check(_with(ip, 33, "<i", faiss.METRIC_L1))


@pytest.mark.parametrize("keep", [4, 20, 33, 44, 46])
def test_a_file_ending_inside_its_header_is_refused(keep: int) -> None:
    data = _flat(faiss.METRIC_L1)[:keep]  # L1: the longest header, 49 bytes with the length
    with pytest.raises(IndexCorruptError, match=f"cannot read {PATH}: it ends inside its header"):
        _check(data)
