"""What a flat FAISS file must hold, checked before FAISS reads it.

FAISS allocates each array of a file at the length the file claims and only then reads
it, so a corrupt or hostile length makes it zero-fill gigabytes (or raise MemoryError)
before it finds the file too short. A flat table (what `index build` writes: identity
vectors and replica features) has one array whose length is fixed by its header, so the
whole file's size is known from its first bytes: anything else is refused here, naming
the file, before a byte is allocated. Other layouts (HNSW, IVF: chosen explicitly) are
left to FAISS, whose MemoryError the caller turns into a refusal.
"""

from __future__ import annotations

import struct
from pathlib import Path

from filter.errors import IndexCorruptError

# faiss/impl/index_write.cpp: the fourcc of IndexFlat by metric (IP, L2, any other), then
# write_index_header: d (int32), ntotal (int64), two dummies (int64), is_trained (1 byte),
# metric_type (int32), metric_arg (float32) only when metric_type > 1; then the codes as
# WRITEXBVECTOR: their length in float32s (uint64), then the bytes.
FLAT_FOURCCS = (b"IxFI", b"IxF2", b"IxFl")
_HEADER = struct.Struct("<4siqqq?i")
_LENGTH = struct.Struct("<Q")
METRIC_ARG_BYTES = 4
# Enough of the file for any flat header and its codes' length.
FLAT_PREFIX_BYTES = _HEADER.size + METRIC_ARG_BYTES + _LENGTH.size


def check_flat_layout(prefix: bytes, file_size: int, path: Path) -> None:
    """Refuse a flat FAISS file whose header disagrees with its size. `prefix` holds the
    file's first FLAT_PREFIX_BYTES bytes (or all of it, if shorter); files of another
    layout pass unchecked."""
    if prefix[:4] not in FLAT_FOURCCS:
        return
    if len(prefix) < _HEADER.size + _LENGTH.size:
        raise IndexCorruptError(f"cannot read {path}: it ends inside its header")
    _, dim, ntotal, _, _, _, metric = _HEADER.unpack_from(prefix)
    start = _HEADER.size + (METRIC_ARG_BYTES if metric > 1 else 0)
    if len(prefix) < start + _LENGTH.size:
        raise IndexCorruptError(f"cannot read {path}: it ends inside its header")
    (floats,) = _LENGTH.unpack_from(prefix, start)
    expected = start + _LENGTH.size + 4 * floats
    if dim <= 0 or ntotal < 0 or floats != dim * ntotal or expected != file_size:
        raise IndexCorruptError(
            f"cannot read {path}: its header claims {ntotal} vectors of dimension {dim} "
            f"({floats} values, {expected} bytes) but the file holds {file_size} bytes"
        )
