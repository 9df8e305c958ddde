"""Index files without a model: save and load, whole-folder rewrites, the build command
named when the index is missing, the index types and the device search."""

import json
from pathlib import Path

import numpy as np
import pytest

from filter.errors import IdentityIndexError
from filter.index import FaissIdentityIndex
from filter.vector_table import choose_index_type


def _random_index(n: int = 50, dim: int = 16, index_type: str = "flat") -> FaissIdentityIndex:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return FaissIdentityIndex.build(
        vectors,
        [f"id{i % 7}" for i in range(n)],
        [f"f{i}.jpg" for i in range(n)],
        embedder_name="test",
        model_sha256="0" * 64,
        detector={"detector": "x"},
        index_type=index_type,  # type: ignore[arg-type]
    )


def test_save_load_roundtrip_keeps_vectors_labels_and_manifest(tmp_path: Path) -> None:
    index = _random_index()
    index.save(tmp_path / "idx")
    loaded = FaissIdentityIndex.load(tmp_path / "idx", expect_embedder="test")
    assert loaded.vector_count == 50 and loaded.identity_count == 7
    assert np.allclose(loaded.vectors(), index.vectors())
    query = index.vectors()[13:14]
    match = loaded.search(query)[0]
    assert match.identity == "id6" and match.similarity == pytest.approx(1.0, abs=1e-5)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vectors.faiss", "labels.json"}
    assert manifest["embedder"] == {"name": "test", "model_sha256": "0" * 64, "dim": 16}


def test_rewrite_replaces_the_folder_whole(tmp_path: Path) -> None:
    _random_index(50).save(tmp_path / "idx")
    _random_index(20).save(tmp_path / "idx")
    assert FaissIdentityIndex.load(tmp_path / "idx").vector_count == 20
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no staging or retired folders


def test_missing_index_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(IdentityIndexError, match="facegate index build") as info:
        FaissIdentityIndex.load(tmp_path / "nothing")
    # Exactly the missing-index error: not one of its corrupt/mismatch subclasses.
    assert type(info.value) is IdentityIndexError


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_each_index_type_finds_exact_duplicates(tmp_path: Path, index_type: str) -> None:
    index = _random_index(400, 32, index_type)
    index.save(tmp_path / index_type)
    loaded = FaissIdentityIndex.load(tmp_path / index_type)
    assert loaded.manifest["index_type"] == index_type
    queries = index.vectors()[::37]
    matches = loaded.search(queries)
    assert all(m.similarity == pytest.approx(1.0, abs=1e-4) for m in matches)


def test_ivf_probing_a_subset_of_its_lists_finds_perturbed_members(tmp_path: Path) -> None:
    """Approximate search for real: nprobe < nlist, and queries near (not equal to) enrolled
    vectors, as a new photo of an enrolled person is."""
    import faiss

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    FaissIdentityIndex.build(
        vectors,
        [f"id{i}" for i in range(len(vectors))],
        [f"f{i}.jpg" for i in range(len(vectors))],
        embedder_name="test",
        model_sha256="0" * 64,
        detector={"detector": "x"},
        index_type="ivf",
    ).save(tmp_path / "ivf")
    loaded = FaissIdentityIndex.load(tmp_path / "ivf")
    ivf = faiss.extract_index_ivf(loaded.faces.index)
    assert 1 < ivf.nprobe < ivf.nlist  # a real subset of the lists is searched
    rows = rng.choice(len(vectors), 300, replace=False)
    queries = vectors[rows] + 0.15 * rng.standard_normal((300, 32)).astype(np.float32) / np.sqrt(32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert float(np.min(np.sum(queries * vectors[rows], axis=1))) < 0.999  # not duplicates
    found = [m.identity == f"id{row}" for m, row in zip(loaded.search(queries), rows, strict=True)]
    assert np.mean(found) >= 0.98  # 1.0 at the shipped nprobe; 0.94 when probing one list


def test_auto_index_type_is_exact_at_every_size() -> None:
    # An approximate index can miss a match that exact search finds: never by default.
    assert choose_index_type(1000) == "flat"
    assert choose_index_type(5_000_000) == "flat"


@pytest.mark.gpu
def test_gpu_exact_search_matches_faiss() -> None:
    index = _random_index(500, 64)
    queries = index.vectors()[::50] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    expected = index.search(queries)
    index.use_device("cuda")
    got = index.search(queries)
    assert [m.identity for m in got] == [m.identity for m in expected]
    assert np.allclose([m.similarity for m in got], [m.similarity for m in expected], atol=2e-3)


def test_the_device_search_rescores_in_fp32_and_agrees_with_faiss() -> None:
    """The GPU path's logic (fp16 candidates, fp32 rescoring), run with CPU tensors: the
    similarities must be FAISS's to fp32 precision, or the threshold would mean something
    else on a GPU. The real CUDA run is the gpu-marked test above."""
    import torch

    index = _random_index(500, 64)
    rng = np.random.default_rng(3)
    queries = index.vectors()[::25] + 0.05 * rng.standard_normal((20, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    expected = index.search(queries)
    table = index.faces
    vectors = torch.from_numpy(table.vectors())
    table._device_vectors, table._device_vectors_exact = vectors.half(), vectors.float()
    got = index.search(queries)
    assert [m.identity for m in got] == [m.identity for m in expected]
    assert np.allclose([m.similarity for m in got], [m.similarity for m in expected], atol=1e-5)


def test_use_device_is_a_no_op_on_the_cpu() -> None:
    index = _random_index(50)
    before = index.search(index.vectors()[:3])
    index.use_device("cpu")
    assert index.search(index.vectors()[:3]) == before
