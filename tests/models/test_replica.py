"""The replica signal under the augmentations generators are trained with (issue 23): the
transforms themselves, one stored row per training image that gives back no more of a
face than format 2's, the query views (mirrored, crops and shifts undone), fail-closed,
the on-disk format, and what `facegate evaluate` reports per transform."""

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
from filter.errors import IdentityIndexError, IndexCorruptError, IndexMismatchError
from filter.evaluate import EvaluationPlan, evaluate_generated
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex
from filter.replica import (
    DEFAULT_COMPONENTS,
    FRAME_DIM,
    QUERY_VIEWS,
    VIEW_MARGIN,
    VIEWS,
    ReplicaFeaturizer,
    frames,
    low_res,
)
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


def test_one_row_per_training_image_is_stored_and_no_more_numbers_than_format_2(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The views are applied to the candidate, never stored: one row of at most 64
    numbers per training image, on disk and in memory, whatever the query views."""
    training = generated["training"]
    assert replica_index.replicas is not None
    assert replica_index.replicas.count == len(training)
    assert replica_index.replicas.dim <= DEFAULT_COMPONENTS == 64
    assert replica_index.replicas.identities == [f"train-{i}" for i in range(len(training))]
    replica_index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    replica = manifest["replica"]
    assert replica["rows_per_image"] == 1 and replica["count"] == len(training)
    assert replica["query_views"] == QUERY_VIEWS == 2 * VIEWS
    stored = (tmp_path / "idx" / "replicas.faiss").stat().st_size
    assert stored < len(training) * 64 * 4 + 1024  # float32 rows and FAISS's small header
    loaded = FaissIdentityIndex.load(tmp_path / "idx")
    assert loaded.replicas is not None and loaded.replicas.count == len(training)
    assert np.array_equal(loaded.replicas.vectors(), replica_index.replicas.vectors())


def test_the_stored_rows_give_back_no_more_of_a_training_image_than_format_2s(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray]
) -> None:
    """The non-invertibility rule in its cheap sense. The map from an image's 3072-number
    working frame to its stored row has rank <= 64 (no near-identity on pixels), and an
    attacker who holds the index and fits a linear decoder on the public generator's
    samples recovers no more of a training image's frame from it than from format 2's row.
    `python -m bench.replica_inversion` measures the same with SFace on 200 images."""
    from bench.replica_v1 import V1Featurizer

    featurizer = replica_index.replica_featurizer
    assert featurizer is not None
    training, public = generated["training"], generated["fresh"]
    # The linear map (before the unit scaling), read off through unit frames.
    unit_frames = np.eye(FRAME_DIM, dtype=np.float32).reshape(-1, 32, 32, 3)
    operator = (low_res(unit_frames) @ featurizer.basis.T).T  # (components, 3072)
    singular = np.linalg.svd(operator, compute_uv=False)
    assert operator.shape[0] <= 64 and int((singular > 1e-6 * singular[0]).sum()) <= 64

    def recovered(stored: np.ndarray, public_rows: np.ndarray) -> float:
        """Share of the training frames' variance a ridge decoder fitted on public pairs
        recovers (the best over a few ridge weights, as an attacker would tune it)."""
        targets = frames(list(public)).reshape(len(public), -1).astype(np.float64)
        truth = frames(list(training)).reshape(len(training), -1).astype(np.float64)
        x_mean, y_mean = public_rows.mean(axis=0), targets.mean(axis=0)
        x, y = public_rows - x_mean, targets - y_mean
        best = -np.inf
        for ridge in (1e-3, 1e-2, 1e-1):
            weights = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)
            rebuilt = (stored - x_mean) @ weights + y_mean
            residual = ((rebuilt - truth) ** 2).sum() / ((truth - y_mean) ** 2).sum()
            best = max(best, 1.0 - float(residual))
        return best

    assert replica_index.replicas is not None
    ours = recovered(replica_index.replicas.vectors(), featurizer.features(list(public)))
    format_2 = V1Featurizer(list(training))
    theirs = recovered(format_2.features(list(training)), format_2.features(list(public)))
    assert ours <= theirs, (ours, theirs)


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
    # As it is too: neither view pays the margin of the views that undo a crop or shift.
    found = replica_index.search_replicas(list(training[:16]))
    assert min(m.similarity for m in found) > 0.999


def test_the_best_view_counts_less_its_margin(
    replica_index: FaissIdentityIndex, generated: dict[str, np.ndarray]
) -> None:
    """The score is the best over the 36 views of cosine minus the view's margin: 0 for the
    candidate as it is and mirrored, VIEW_MARGIN for a view that undoes a crop or shift."""
    featurizer = replica_index.replica_featurizer
    assert featurizer is not None and replica_index.replicas is not None
    margins = featurizer.view_margins()
    assert margins[0] == margins[VIEWS] == 0.0
    assert np.all(np.delete(margins, [0, VIEWS]) == VIEW_MARGIN) and VIEW_MARGIN > 0
    training = generated["training"]
    candidates = [crop(training[0], 0.85, 0.0, 1.0), shift(training[1], 0.1, 0.1)]
    candidates += list(generated["fresh"][:6])
    table = replica_index.replicas.vectors()
    cosines = np.einsum("nvk,mk->nvm", featurizer.queries(candidates), table)
    expected = (cosines.max(axis=2) - margins).max(axis=1)
    found = replica_index.search_replicas(candidates)
    assert np.allclose([m.similarity for m in found], expected, atol=1e-5)
    # The two copies are found, and a view that undoes their crop or shift meets the
    # original more closely than the candidate as it is or mirrored (before the margin).
    assert [m.identity for m in found[:2]] == ["train-0", "train-1"]
    assert all(int(np.argmax(c.max(axis=1))) not in (0, VIEWS) for c in cosines[:2])


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
    shift, a mirrored corner crop. Random draws rarely reach them, and they are the
    hardest case for views applied to the candidate: up to 28 % of the frame is reflected
    border that no view can restore. The replica signal alone, at the 95th percentile of
    fresh samples, measured 0.92, 0.81 and 0.92 here (format 2: about half); the identity
    signal adds to that in the filter (README "The threshold")."""
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
    floors = {"corner crop": 0.85, "diagonal shift": 0.75, "mirrored corner crop": 0.85}
    for name, copies in worst.items():
        found = replica_index.search_replicas(copies)
        caught = np.mean([m.similarity >= threshold for m in found])
        own = np.mean([m.identity == f"train-{i}" for i, m in enumerate(found)])
        assert caught >= floors[name] and own >= floors[name], (name, caught, own, threshold)


def test_an_image_any_of_whose_view_searches_finds_nothing_is_no_match(
    replica_index: FaissIdentityIndex,
    generated: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fail closed: the views that did find a neighbour must not decide when one found
    nothing (a NaN query reaches no neighbour); the filter then rejects the image."""
    real = ReplicaFeaturizer.queries
    assert QUERY_VIEWS == 36

    def partly_broken(self: ReplicaFeaturizer, images: list[np.ndarray]) -> np.ndarray:
        rows = real(self, images)
        assert rows.shape[:2] == (len(images), QUERY_VIEWS)
        rows[0, 5] = np.nan  # image 0: one view that undoes a crop
        rows[1, VIEWS] = np.nan  # image 1: the mirror image as it is
        rows[2, QUERY_VIEWS - 1] = np.nan  # image 2: the last view
        return rows

    monkeypatch.setattr(ReplicaFeaturizer, "queries", partly_broken)
    found = replica_index.search_replicas(list(generated["training"][:4]))
    assert found[:3] == [NO_MATCH] * 3 and found[3].identity == "train-3"


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
        calibration=40,  # two signals at 5 %: a budget of two (README, "The threshold")
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
    from tests.commands import facegate

    result = facegate("evaluate", "--transform", "sepia")
    assert result.returncode == 2
    assert "unknown --transform sepia" in result.stderr and "mirrored" in result.stderr


def test_evaluate_refuses_a_det_path_it_cannot_write_before_evaluating(tmp_path: Path) -> None:
    """`--det DIR` ran the whole evaluation, then matplotlib wrote DIR.png beside it."""
    from tests.commands import facegate

    for det, said in (
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "det.png", "does not exist"),
        (tmp_path / "det", "name a .png, .svg or .pdf file"),
    ):
        result = facegate("evaluate", "--det", str(det))
        assert result.returncode == 2 and said in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_training_image_without_a_usable_replica_feature_stops_the_build(
    generated: dict[str, np.ndarray],
) -> None:
    """A NaN row would never be returned by FAISS, so a copy of that image could never
    match: the build refuses it, naming the image, rather than enrol it silently."""
    training = generated["training"]
    framed = frames(list(training))
    featurizer = ReplicaFeaturizer.fit(framed)
    rows = featurizer.enrolled(framed)
    rows[5] = np.nan
    labels = [f"train-{i}" for i in range(len(training))]
    faces = np.random.default_rng(0).standard_normal((len(training), 16)).astype(np.float32)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    with pytest.raises(IdentityIndexError, match="train-5"):
        FaissIdentityIndex.build(
            faces,
            labels,
            labels,
            embedder_name="test",
            model_sha256="0" * 64,
            detector=DETECTOR,
            replica_features=rows,
            replica_identities=labels,
            replica_sources=labels,
            replica_featurizer=featurizer,
        )
