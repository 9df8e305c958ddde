"""An index built from the test photos with the real models is refused when it was built
with another embedder, or when its vectors, labels or manifest were altered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from filter.assembly import load_index_for
from filter.errors import IndexCorruptError, IndexMismatchError
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex


def test_embedder_mismatch_is_refused(full_index: Path, pipeline: FaceEmbeddingPipeline) -> None:
    with pytest.raises(IndexMismatchError, match=r"built with embedder 'sface'.*'facenet'"):
        FaissIdentityIndex.load(full_index, expect_embedder="facenet")
    with pytest.raises(IndexMismatchError, match="model sha256"):
        FaissIdentityIndex.load(full_index, expect_embedder="sface", expect_model_sha256="f" * 64)
    assert load_index_for(pipeline, full_index).vector_count > 0


def test_truncated_vectors_file_is_refused(full_index: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(full_index, broken)
    data = (broken / "vectors.faiss").read_bytes()
    (broken / "vectors.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError, match="truncated"):
        FaissIdentityIndex.load(broken)


def test_altered_labels_and_bad_manifest_are_refused(full_index: Path, tmp_path: Path) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(full_index, altered)
    labels = (altered / "labels.json").read_text().replace("id01", "id0X")
    (altered / "labels.json").write_text(labels)
    with pytest.raises(IndexCorruptError, match="sha256"):
        FaissIdentityIndex.load(altered)
    (altered / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="not a valid manifest"):
        FaissIdentityIndex.load(altered)
