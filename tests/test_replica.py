"""The replica signal under the augmentations generators are trained with (issue 23): the
transforms themselves, the enrolled views, the mirrored search, the on-disk format, and
what `facegate evaluate` reports per transform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from filter.augment import (
    PROBE_NAMES,
    PROBE_TRANSFORMS,
    brightness,
    contrast,
    crop,
    mirror,
    probe_transform,
    recompress,
    rotate,
    shift,
    transformed,
)
from filter.det_plot import draw_det
from filter.errors import IndexCorruptError, IndexMismatchError
from filter.evaluate import EvaluationPlan, evaluate_generated
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex
from filter.replica import VIEWS, ReplicaFeaturizer, frames
from filter.vector_table import NO_MATCH
from service.generators import latents_for, load_dcgan_digiface

DETECTOR = {"detector": "test", "detector_version": 1}


@pytest.fixture(scope="module")
def generated(models_dir: Path) -> dict[str, np.ndarray]:
    generator = load_dcgan_digiface(models_dir)

    def sample(seed: int, count: int) -> np.ndarray:
        return generator.generate(np.stack([latents_for(seed, s, 0, 100) for s in range(count)]))

    return {"training": sample(2301, 48), "fresh": sample(2302, 120)}


def _replica_index(training: np.ndarray) -> FaissIdentityIndex:
    framed = frames(list(training))
    featurizer = ReplicaFeaturizer.fit(framed)
    labels = [f"train-{i}" for i in range(len(training))]
    faces = np.random.default_rng(0).standard_normal((len(training), 16)).astype(np.float32)
    return FaissIdentityIndex.build(
        faces / np.linalg.norm(faces, axis=1, keepdims=True),
        labels,
        labels,
        embedder_name="test",
        model_sha256="0" * 64,
        detector=DETECTOR,
        replica_features=featurizer.enrolled(framed),
        replica_identities=labels,
        replica_sources=labels,
        replica_featurizer=featurizer,
    )


@pytest.fixture(scope="module")
def replica_index(generated: dict[str, np.ndarray]) -> FaissIdentityIndex:
    return _replica_index(generated["training"])


# --- the transforms -------------------------------------------------------------------


def test_the_transforms_keep_the_frame_and_do_what_they_say() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert np.array_equal(mirror(mirror(image)), image)
    assert np.array_equal(mirror(image)[:, 0], image[:, -1])
    assert np.array_equal(shift(image, 0.0, 0.0), image)
    assert np.array_equal(crop(image, 1.0), image)
    assert np.array_equal(rotate(image, 0.0), image)
    # A shift by 1/8 of the width moves column c to column c + 6.
    assert np.array_equal(shift(image, 6 / 48, 0.0)[:, 6:], image[:, :-6])
    # The central window, magnified: the centre pixel stays where it was.
    flat = np.zeros((65, 65, 3), np.uint8)
    flat[32, 32] = 255
    assert crop(flat, 0.5)[32, 32].max() == 255
    assert brightness(np.full((4, 4, 3), 100, np.uint8), 1.1).max() == 110
    assert np.ptp(contrast(image, 0.9)) < np.ptp(image)
    for out in (
        crop(image, 0.85, 0.0, 1.0),
        rotate(image, 5),
        recompress(image, "JPEG", 50),
        recompress(image, "WEBP", 50),
    ):
        assert out.shape == image.shape and out.dtype == np.uint8


def test_probe_sets_are_reproducible_from_their_seed_and_cover_the_issue() -> None:
    images = list(np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    for transform in PROBE_TRANSFORMS:
        first = transformed(images, transform, seed=7)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(first, transformed(images, transform, 7), strict=True)
        )
    assert {"mirrored", "crop_center_85", "shift_15", "rotate_5", "jpeg", "webp"} <= set(
        PROBE_NAMES
    )
    with pytest.raises(KeyError, match="unknown transform"):
        probe_transform("sepia")


# --- the feature ----------------------------------------------------------------------


def test_each_training_image_is_enrolled_as_its_views_under_one_label(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray], tmp_path: Path
) -> None:
    assert replica_index.replicas is not None
    assert replica_index.replicas.count == VIEWS * len(generated["training"])
    identities, _ = replica_index.replica_images()
    assert identities == [f"train-{i}" for i in range(len(generated["training"]))]
    replica_index.save(tmp_path / "idx")
    labels = json.loads((tmp_path / "idx" / "replica_labels.json").read_text())
    assert len(labels) == len(generated["training"])  # one label per image, not per view
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    assert manifest["replica"]["views"] == VIEWS and manifest["replica"]["query_mirrored"]
    loaded = FaissIdentityIndex.load(tmp_path / "idx")
    assert loaded.replica_images() == replica_index.replica_images()
    # A labels file that does not cover every view's row is refused.
    (tmp_path / "idx" / "replica_labels.json").write_text(json.dumps(labels[:-1]))
    _rehash(tmp_path / "idx")
    with pytest.raises(IndexCorruptError, match="labels"):
        FaissIdentityIndex.load(tmp_path / "idx")


def _rehash(folder: Path) -> None:
    from filter.models import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(folder / name)
        entry["bytes"] = (folder / name).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_mirrored_copy_meets_its_original_exactly(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray]
) -> None:
    training = generated["training"]
    found = replica_index.search_replicas([mirror(image) for image in training[:16]])
    assert [m.identity for m in found] == [f"train-{i}" for i in range(16)]
    assert min(m.similarity for m in found) > 0.999


def test_every_augmentation_is_caught_at_a_5_percent_false_reject_rate(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray]
) -> None:
    """The replica signal alone, its threshold at the 95th percentile of fresh samples:
    copies of training images, however augmented, score above it and find their own image."""
    fresh = np.array(
        [m.similarity for m in replica_index.search_replicas(list(generated["fresh"]))]
    )
    threshold = float(np.quantile(fresh, 0.95))
    training = generated["training"]
    for k, transform in enumerate(PROBE_TRANSFORMS):
        copies = transformed(training, transform, seed=100 + k)
        found = replica_index.search_replicas(copies)
        caught = [m.similarity >= threshold for m in found]
        own = [m.identity == f"train-{i}" for i, m in enumerate(found)]
        assert np.mean(caught) >= 0.95, (transform.name, np.mean(caught), threshold)
        assert np.mean(own) >= 0.95, (transform.name, np.mean(own))


def test_the_worst_crops_and_shifts_are_caught_too(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray]
) -> None:
    """The corners of the issue's bounds: an 85 % window in a corner, a 15 % diagonal
    shift, each mirrored or not. Random draws rarely reach them."""
    fresh = np.array(
        [m.similarity for m in replica_index.search_replicas(list(generated["fresh"]))]
    )
    threshold = float(np.quantile(fresh, 0.95))
    training = list(generated["training"])
    worst = {
        "corner crop": [crop(image, 0.85, i % 2, (i // 2) % 2) for i, image in enumerate(training)],
        "diagonal shift": [
            shift(image, 0.15 * (1 - 2 * (i % 2)), 0.15 * (1 - 2 * ((i // 2) % 2)))
            for i, image in enumerate(training)
        ],
    }
    worst["mirrored corner crop"] = [mirror(image) for image in worst["corner crop"]]
    for name, copies in worst.items():
        found = replica_index.search_replicas(copies)
        caught = np.mean([m.similarity >= threshold for m in found])
        assert caught >= 0.95, (name, caught, threshold)


def test_an_image_whose_either_search_finds_nothing_is_no_match(
    replica_index: FaissIdentityIndex,
    generated: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fail closed: the as-is search alone must not decide when the other found nothing
    (a NaN query reaches no neighbour); the filter then rejects the image."""
    real = ReplicaFeaturizer.queries

    def half_broken(self: ReplicaFeaturizer, images: list[np.ndarray]) -> np.ndarray:
        rows = real(self, images)
        rows[0, 0] = np.nan  # image 0: the as-is search finds nothing
        rows[1, 1] = np.nan  # image 1: the mirrored one
        return rows

    monkeypatch.setattr(ReplicaFeaturizer, "queries", half_broken)
    found = replica_index.search_replicas(list(generated["training"][:3]))
    assert found[:2] == [NO_MATCH, NO_MATCH] and found[2].identity == "train-2"


def test_an_index_with_the_previous_replica_feature_is_refused_with_the_rebuild_command(
    replica_index: FaissIdentityIndex, tmp_path: Path
) -> None:
    folder = tmp_path / "old"
    replica_index.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError) as refused:
        FaissIdentityIndex.load(folder)
    message = str(refused.value)
    assert "format 2" in message and "mirrored" in message
    assert f"facegate index build GALLERY --out {folder}" in message
    # The same format with another replica feature is refused too.
    manifest["format_version"] = 3
    manifest["replica"]["feature"] = "lowfreq-pca-whitened-v1"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="rebuild the index"):
        FaissIdentityIndex.load(folder)


# --- what evaluate reports -------------------------------------------------------------


def test_evaluate_reports_recall_per_transform_in_its_lines_and_the_det_legend(
    pipeline: FaceEmbeddingPipeline, models_dir: Path, tmp_path: Path
) -> None:
    generator = load_dcgan_digiface(models_dir)
    plan = EvaluationPlan(
        gallery=36,
        near_copies=6,
        sigmas=(0.2,),
        calibration=24,
        test=24,
        transformed=6,
        seed=2323,
    )
    evaluation, index = evaluate_generated(
        generator.generate, lambda seed, slot: latents_for(seed, slot, 0, 100), pipeline, plan
    )
    assert index.has_replicas
    lines = {str(line["set"]): line for line in evaluation.lines()}
    for name in PROBE_NAMES:
        line = lines[f"copies_{name}"]
        assert line["transform"] == name and line["images"] == 6
        assert 0.0 <= float(line["recall"]) <= 1.0  # type: ignore[arg-type]
        assert {"rejected_identity", "rejected_replica", "passed", "no_face"} <= set(line)
    # Mirrored copies meet their original exactly, whatever the thresholds.
    assert lines["copies_mirrored"]["recall"] == 1.0
    assert "false_reject" in lines["fresh_test"] and "recall" not in lines["fresh_test"]
    legend = draw_det(evaluation, tmp_path / "det.png")
    assert (tmp_path / "det.png").stat().st_size > 10_000
    for name in PROBE_NAMES:
        recall = float(lines[f"copies_{name}"]["recall"])  # type: ignore[arg-type]
        assert f"{name}: recall {recall:.3f}" in legend
    assert any(text.startswith("calibrated operating point: recall") for text in legend)


def test_evaluate_names_an_unknown_transform_and_the_known_ones() -> None:
    from tests.test_cli import facegate

    result = facegate("evaluate", "--transform", "sepia")
    assert result.returncode == 2
    assert "unknown --transform sepia" in result.stderr and "mirrored" in result.stderr
