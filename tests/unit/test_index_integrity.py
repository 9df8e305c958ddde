"""Loading refuses every index that could let an enrolled face out: foreign metric or
dimension, empty, another detector, an old format, a broken calibration, vectors that
fail the self-test; and a missing neighbour never reads as a low similarity."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.faces import DetectorSettings
from filter.index import FaissIdentityIndex
from filter.models import sha256_file
from filter.replica import ReplicaFeaturizer
from filter.vector_table import IndexType, VectorTable

DETECTOR = DetectorSettings().as_dict()


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _index(n: int = 60, dim: int = 16, index_type: IndexType = "auto") -> FaissIdentityIndex:
    rng = np.random.default_rng(3)
    vectors = _unit(rng.standard_normal((n, dim)))
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    from filter.replica import frames

    framed = frames(list(images))
    featurizer = ReplicaFeaturizer.fit(framed, components=8)
    return FaissIdentityIndex.build(
        vectors,
        [f"id{i % 6}" for i in range(n)],
        [f"f{i}.jpg" for i in range(n)],
        embedder_name="test",
        model_sha256="0" * 64,
        detector=DETECTOR,
        replica_features=featurizer.enrolled(framed),
        replica_identities=[f"id{i % 6}" for i in range(n)],
        replica_sources=[f"f{i}.jpg" for i in range(n)],
        replica_featurizer=featurizer,
        index_type=index_type,
    )


def _saved(tmp_path: Path, name: str = "idx", index_type: IndexType = "auto") -> Path:
    folder = tmp_path / name
    _index(index_type=index_type).save(folder)
    return folder


def _rehash(folder: Path) -> None:
    """Update the manifest's hashes after a deliberate change: what an attacker or a
    careless tool would do; only the content checks can catch it then."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {
            "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size,
        }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _replace_faiss(folder: Path, index: object) -> None:
    faiss.write_index(index, str(folder / "vectors.faiss"))
    _rehash(folder)


def test_a_sound_index_loads_and_finds_itself(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    loaded = FaissIdentityIndex.load(folder, expect_dim=16, expect_detector=DETECTOR)
    original = _index()
    assert loaded.search(original.vectors()[7:8])[0] == original.search(original.vectors()[7:8])[0]
    assert loaded.has_replicas and loaded.fingerprint == FaissIdentityIndex.load(folder).fingerprint


def test_a_foreign_l2_index_of_the_same_vectors_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    foreign = faiss.IndexFlatL2(16)
    foreign.add(_index().vectors())
    _replace_faiss(folder, foreign)
    with pytest.raises(IndexMismatchError, match="not inner product"):
        FaissIdentityIndex.load(folder)


def test_a_faiss_dimension_that_differs_from_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    other = faiss.IndexFlatIP(8)
    other.add(_unit(np.random.default_rng(0).standard_normal((60, 8))))
    _replace_faiss(folder, other)
    with pytest.raises(IndexMismatchError, match="8-d vectors, the manifest says 16-d"):
        FaissIdentityIndex.load(folder)


def test_an_embedder_dimension_mismatch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexMismatchError, match="16-d vectors, the embedder gives 128-d"):
        FaissIdentityIndex.load(_saved(tmp_path), expect_dim=128)


def test_an_empty_index_is_neither_built_nor_loaded(tmp_path: Path) -> None:
    with pytest.raises(IdentityIndexError, match="release every face"):
        FaissIdentityIndex.build(
            np.zeros((0, 16), np.float32),
            [],
            [],
            embedder_name="test",
            model_sha256="0" * 64,
            detector=DETECTOR,
        )
    folder = _saved(tmp_path)
    _replace_faiss(folder, faiss.IndexFlatIP(16))
    (folder / "labels.json").write_text("[]")
    _rehash(folder)
    with pytest.raises(IndexCorruptError, match="holds no vectors"):
        FaissIdentityIndex.load(folder)


def test_vectors_that_are_not_unit_length_fail_the_self_test(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    scaled = faiss.IndexFlatIP(16)
    scaled.add(_index().vectors() * 2.0)
    _replace_faiss(folder, scaled)
    with pytest.raises(IndexCorruptError, match="not unit length"):
        FaissIdentityIndex.load(folder)


def test_an_index_whose_rows_cannot_be_found_fails_the_self_test(tmp_path: Path) -> None:
    """An IVF index whose coarse quantizer no longer matches its lists (a broken or
    mismatched file) stores every vector yet finds almost none of them."""
    folder = _saved(tmp_path)
    vectors = _index().vectors()
    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    ivf.quantizer.reset()
    ivf.quantizer.add(_unit(np.random.default_rng(9).standard_normal((8, 16))))
    ivf.nprobe = 1
    _replace_faiss(folder, ivf)
    with pytest.raises(IndexCorruptError, match="self-test failed") as refused:
        FaissIdentityIndex.load(folder)
    # The refusal reaches the server's log (startup, reload), which names no one.
    assert not set(_index().faces.identities) & set(re.findall(r"\bid\d+\b", str(refused.value)))
    assert "row" in str(refused.value)


def _flat_index(vectors: np.ndarray, identities: list[str]) -> FaissIdentityIndex:
    return FaissIdentityIndex.build(
        vectors,
        identities,
        [f"f{i}.jpg" for i in range(len(identities))],
        embedder_name="test",
        model_sha256="0" * 64,
        detector=DETECTOR,
        index_type="flat",
    )


def test_more_copies_of_one_face_than_neighbours_searched_pass_the_self_test(
    tmp_path: Path,
) -> None:
    """One group photo enrolled under each of the twelve people in it: twelve equal
    vectors under twelve names, more than the self-test's neighbours."""
    rng = np.random.default_rng(5)
    group = np.repeat(_unit(rng.standard_normal((1, 16))), 12, axis=0)
    others = _unit(rng.standard_normal((28, 16)))
    labels = [f"person {i}" for i in range(12)] + [f"other {i}" for i in range(28)]
    folder = tmp_path / "idx"
    _flat_index(np.concatenate([group, others]), labels).save(folder)
    assert FaissIdentityIndex.load(folder).vector_count == 40


def test_a_table_of_copies_of_one_vector_fails_the_self_test(tmp_path: Path) -> None:
    """Every row a copy of one vector: each finds itself among its copies, but such a
    table matches almost nothing; it is broken, not a group photo."""
    vector = _unit(np.random.default_rng(6).standard_normal((1, 16)))
    folder = tmp_path / "idx"
    _flat_index(np.repeat(vector, 40, axis=0), [f"p{i}" for i in range(40)]).save(folder)
    with pytest.raises(IndexCorruptError, match="collapsed"):
        FaissIdentityIndex.load(folder)


def test_a_detector_that_changes_embeddings_is_refused_but_search_scope_is_not(
    tmp_path: Path,
) -> None:
    folder = _saved(tmp_path)
    other = DetectorSettings(thresholds=(0.5, 0.7, 0.7)).as_dict()
    with pytest.raises(IndexMismatchError, match=r"thresholds.*Rebuild the index"):
        FaissIdentityIndex.load(folder, expect_detector=other)
    scoped = DetectorSettings(min_face_fraction=0.5).as_dict()
    assert FaissIdentityIndex.load(folder, expect_detector=scoped).vector_count == 60


def test_an_older_format_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=r"format 1.*facegate index build"):
        FaissIdentityIndex.load(folder)


@pytest.mark.parametrize("missing", ["vectors.faiss", "labels.json", "replica_projection.npy"])
def test_a_missing_file_is_refused(tmp_path: Path, missing: str) -> None:
    folder = _saved(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(IndexCorruptError, match=f"missing {missing}"):
        FaissIdentityIndex.load(folder)


def test_a_same_size_tampered_vectors_file_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = bytearray((folder / "vectors.faiss").read_bytes())
    data[-5] ^= 0xFF
    (folder / "vectors.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="does not match the sha256"):
        FaissIdentityIndex.load(folder)


def test_the_calibration_travels_with_the_index_and_is_checked(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    _index().with_calibration({"threshold": 0.55, "replica_threshold": 0.7}).save(folder)
    loaded = FaissIdentityIndex.load(folder)
    assert loaded.calibration == {"threshold": 0.55, "replica_threshold": 0.7}
    uncalibrated = _saved(tmp_path, "plain")
    assert FaissIdentityIndex.load(uncalibrated).fingerprint != loaded.fingerprint
    # A lowered threshold would let lookalikes through: an edit is refused.
    saved = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(
        json.dumps({**saved, "threshold": 0.95}, indent=2, sort_keys=True) + "\n"
    )
    with pytest.raises(IndexCorruptError, match=r"sha256|truncated or replaced"):
        FaissIdentityIndex.load(folder)
    for bad in (
        '{"threshold": 7, "replica_threshold": 0.7}',
        # JSON true reads as the int 1 in Python: a threshold of 1.0 turns a signal off.
        '{"threshold": true, "replica_threshold": 0.7}',
        '{"threshold": 0.55, "replica_threshold": true}',
    ):
        (folder / "calibration.json").write_text(bad)
        _rehash(folder)
        with pytest.raises(IndexCorruptError, match="not a valid calibration"):
            FaissIdentityIndex.load(folder)


def test_an_unlisted_file_in_the_manifest_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    shutil.copy(folder / "labels.json", folder / "extra.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["extra.json"] = {"sha256": sha256_file(folder / "extra.json"), "bytes": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="unknown file"):
        FaissIdentityIndex.load(folder)


def test_a_nan_query_finds_no_neighbour_and_does_not_hide_another(tmp_path: Path) -> None:
    index = _index()
    queries = index.vectors()[:3].copy()
    queries[1, 4] = np.nan
    matches = index.search(queries)
    assert matches[0].found and matches[2].found
    assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert not matches[1].found and math.isnan(matches[1].similarity)


def test_an_approximate_index_that_returns_no_row_gives_no_match() -> None:
    """IVF with nprobe 1 searching a list that holds nothing returns row -1."""
    rng = np.random.default_rng(0)
    centre_a, centre_b = _unit(rng.standard_normal((2, 16)))
    cluster_a = _unit(centre_a + 0.05 * rng.standard_normal((200, 16)))
    cluster_b = _unit(centre_b + 0.05 * rng.standard_normal((200, 16)))
    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, 2, faiss.METRIC_INNER_PRODUCT)
    ivf.train(np.vstack([cluster_a, cluster_b]))
    ivf.add(cluster_a)  # cluster b's list stays empty
    ivf.nprobe = 1
    assert ivf.search(cluster_b[:1], 1)[1][0, 0] == -1
    table = VectorTable("faces", ivf, ["a"] * 200, ["x"] * 200)
    matches = table.search(np.vstack([cluster_a[:1], cluster_b[:1]]))
    assert matches[0].found and not matches[1].found


# Where the first array's length sits in the files `index build` writes: after the fourcc
# and FAISS's index header (filter/faiss_layout.py); for HNSW, the level probabilities.
FIRST_LENGTH_AT = 37


def _claim_length(folder: Path, name: str, values: int) -> None:
    data = bytearray((folder / name).read_bytes())
    struct.pack_into("<Q", data, FIRST_LENGTH_AT, values)
    (folder / name).write_bytes(bytes(data))
    _rehash(folder)


@pytest.mark.parametrize("name", ["vectors.faiss", "replicas.faiss"])
def test_a_flat_file_claiming_more_than_it_holds_is_refused_before_faiss_allocates(
    tmp_path: Path, name: str
) -> None:
    folder = _saved(tmp_path)
    size = (folder / name).stat().st_size
    _claim_length(folder, name, 1 << 28)  # 1 GiB FAISS would zero-fill before reading
    with pytest.raises(IndexCorruptError, match=f"claims .* the file holds {size} bytes"):
        FaissIdentityIndex.load(folder)


def test_a_file_claiming_an_array_beyond_memory_is_refused_not_raised(tmp_path: Path) -> None:
    """An HNSW table's arrays are left to FAISS, whose allocation fails (MemoryError)."""
    folder = _saved(tmp_path, index_type="hnsw")
    # 512 GiB of doubles: under FAISS's own bound on an array (1 TiB), over any machine here.
    _claim_length(folder, "vectors.faiss", 1 << 36)
    with pytest.raises(IndexCorruptError, match="larger than this machine's memory"):
        FaissIdentityIndex.load(folder)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda m: m["embedder"].update(dim="x"), "embedder.dim is 'x'"),
        (lambda m: m["embedder"].update(dim=None), "embedder.dim is None"),
        (lambda m: m["replica"].update(components="x"), "replica.components is 'x'"),
    ],
)
def test_a_manifest_with_a_malformed_size_is_corrupt_naming_the_file(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], said: str
) -> None:
    """`int(...)` of such a field escaped as a ValueError traceback (exit 1, no path), and
    a server's reload logged only that text."""
    folder = _saved(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match=rf"{folder}/manifest\.json: {re.escape(said)}"):
        FaissIdentityIndex.load(folder)


def test_an_index_path_naming_a_file_says_so(tmp_path: Path) -> None:
    """It said the index "does not exist", and the operator looked for a missing file."""
    missing, a_file = tmp_path / "missing", tmp_path / "index.faiss"
    a_file.write_bytes(b"")
    with pytest.raises(IdentityIndexError, match="missing does not exist; build one"):
        FaissIdentityIndex.load(missing)
    with pytest.raises(IdentityIndexError, match=r"index\.faiss is a file, not an index folder"):
        FaissIdentityIndex.load(a_file)
