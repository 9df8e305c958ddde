"""Real faces through the real filter: matching, multi-face, no-face policy, batching."""

from pathlib import Path

import numpy as np
import pytest

from filter.decide import NoFacePolicy, Reason
from filter.faces import DetectorSettings
from filter.gallery import build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter, StageTimes
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.thresholds import pinned_thresholds
from tests.conftest import make_gallery

THRESHOLD = 0.40


def _index_of(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path, tmp_path: Path, ids: list[str]
) -> FaissIdentityIndex:
    gallery = make_gallery(identities_dir, tmp_path / "gallery", ids)
    index, report = build_gallery_index(
        gallery, pipeline, detector_settings=DetectorSettings().as_dict()
    )
    assert report.identities == len(ids)
    return index


def test_same_person_matches_across_photos_leave_one_out(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path, tmp_path: Path
) -> None:
    # Enrol every photo of id01 but the first; the first must still match id01.
    gallery = tmp_path / "gallery" / "id01"
    gallery.mkdir(parents=True)
    photos = sorted((identities_dir / "id01").glob("*.jpg"))
    for p in photos[1:]:
        (gallery / p.name).symlink_to(p)
    index, _ = build_gallery_index(
        tmp_path / "gallery", pipeline, detector_settings=DetectorSettings().as_dict()
    )
    filt = IdentityFilter(pipeline, index, pinned_thresholds(index, THRESHOLD))
    verdict = filt.check([decode_image(photos[0])])[0]
    assert not verdict.passed
    assert verdict.reason is Reason.IDENTITY_MATCH and verdict.identity == "id01"
    assert verdict.max_similarity is not None and verdict.max_similarity >= THRESHOLD


def test_different_people_do_not_match(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path, tmp_path: Path
) -> None:
    index = _index_of(pipeline, identities_dir, tmp_path, ["id01", "id02", "id03"])
    filt = IdentityFilter(pipeline, index, pinned_thresholds(index, THRESHOLD))
    others = [
        decode_image(p)
        for i in ("id04", "id05", "id06", "id07")
        for p in sorted((identities_dir / i).glob("*.jpg"))
    ]
    verdicts = filt.check(others)
    assert all(v.faces >= 1 for v in verdicts)
    assert [v.verdict for v in verdicts] == ["pass"] * len(others)
    assert all(v.identity is None for v in verdicts)


def test_multi_face_photo_is_rejected_when_one_person_is_enrolled(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path, faces_dir: Path, tmp_path: Path
) -> None:
    index = _index_of(pipeline, identities_dir, tmp_path, ["id01"])
    filt = IdentityFilter(pipeline, index, pinned_thresholds(index, THRESHOLD))
    verdict = filt.check([decode_image(faces_dir / "multi" / "two-people.jpg")])[0]
    assert verdict.faces == 2
    assert not verdict.passed and verdict.identity == "id01"
    # One face is id01, the other is not: the image is rejected on the strength of one face.
    sims = sorted(verdict.face_similarities)
    assert sims[0] < THRESHOLD <= sims[1]


def test_no_face_image_follows_the_policy(
    pipeline: FaceEmbeddingPipeline, loaded_full_index: FaissIdentityIndex
) -> None:
    gradient = np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (150, 1, 3))
    strict = IdentityFilter(
        pipeline, loaded_full_index, pinned_thresholds(loaded_full_index, THRESHOLD)
    )
    verdict = strict.check([gradient])[0]
    assert verdict.faces == 0 and not verdict.passed and verdict.reason is Reason.NO_FACE
    lenient = IdentityFilter(
        pipeline,
        loaded_full_index,
        pinned_thresholds(loaded_full_index, THRESHOLD),
        NoFacePolicy.PASS,
    )
    assert lenient.check([gradient])[0].passed


def test_batched_check_equals_one_by_one_and_reports_stage_times(
    pipeline: FaceEmbeddingPipeline, loaded_full_index: FaissIdentityIndex, identities_dir: Path
) -> None:
    images = [decode_image(p) for p in sorted(identities_dir.glob("id0[23]/*.jpg"))]
    filt = IdentityFilter(
        pipeline, loaded_full_index, pinned_thresholds(loaded_full_index, THRESHOLD)
    )
    times = StageTimes()
    batched = filt.check(images, observer=times)
    single = [filt.check([img])[0] for img in images]
    assert [v.verdict for v in batched] == [v.verdict for v in single]
    assert np.allclose(
        [v.max_similarity for v in batched], [v.max_similarity for v in single], atol=1e-4
    )
    assert all(times.seconds[s] > 0 for s in ("detect", "embed", "search"))


def test_threshold_outside_cosine_range_is_refused(
    pipeline: FaceEmbeddingPipeline, loaded_full_index: FaissIdentityIndex
) -> None:
    with pytest.raises(ValueError, match="outside"):
        IdentityFilter(pipeline, loaded_full_index, pinned_thresholds(loaded_full_index, 1.5))
