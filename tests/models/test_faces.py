import cv2
import numpy as np
import pytest

from filter.alignment import ARCFACE_TEMPLATE_112, align_face, similarity_transform
from filter.faces import DetectorSettings, MtcnnDetector, detection_scale


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector()


def test_detection_scale_bounds_large_and_upscales_small() -> None:
    settings = DetectorSettings(max_side=640, min_side=160)
    assert detection_scale(2000, 1000, settings) == pytest.approx(0.32)
    assert detection_scale(64, 64, settings) == pytest.approx(2.5)
    assert detection_scale(400, 300, settings) == 1.0


def test_small_generated_size_face_is_found(detector: MtcnnDetector, photo: np.ndarray) -> None:
    faces = detector.detect([photo])[0]
    x1, y1, x2, y2 = (int(v) for v in faces[0].box)
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(side * 0.8)
    crop = photo[max(0, cy - half) : cy + half, max(0, cx - half) : cx + half]
    tiny = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA)
    found = detector.detect([tiny])[0]
    assert len(found) == 1
    # Landmarks come back in the 64x64 frame, eyes above the mouth.
    lm = found[0].landmarks
    assert (lm >= 0).all() and (lm <= 64).all()
    assert lm[0, 1] < lm[3, 1] and lm[1, 1] < lm[4, 1]


def test_large_photo_landmarks_map_back_to_full_resolution(
    detector: MtcnnDetector, photo: np.ndarray
) -> None:
    small = detector.detect([photo])[0][0]
    big = cv2.resize(photo, None, fx=5.0, fy=5.0, interpolation=cv2.INTER_CUBIC)
    large = detector.detect([big])[0]
    assert len(large) == 1
    # Same face, five times the coordinates (within a few source pixels).
    assert np.abs(large[0].landmarks / 5.0 - small.landmarks).max() < 4.0


def test_batch_of_equal_size_images_matches_single_calls(
    detector: MtcnnDetector, photo: np.ndarray
) -> None:
    blank = np.full_like(photo, 128)
    batched = detector.detect([photo, blank, photo])
    single = detector.detect([photo])
    assert [len(f) for f in batched] == [len(single[0]), 0, len(single[0])]
    assert np.allclose(batched[0][0].landmarks, single[0][0].landmarks, atol=1e-3)


def test_alignment_puts_landmarks_on_the_template(
    detector: MtcnnDetector, photo: np.ndarray
) -> None:
    face = detector.detect([photo])[0][0]
    matrix = similarity_transform(face.landmarks, ARCFACE_TEMPLATE_112)
    mapped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE_112).max() < 8.0
    crop = align_face(photo, face.landmarks, 112)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # Re-detecting on the aligned crop: eyes level (rotation removed) and at the template's
    # eye columns. (MTCNN places eyes a few pixels low on tight crops, so rows are not compared.)
    again = detector.detect([crop])[0]
    assert again
    eyes = again[0].landmarks[:2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 2.0
    assert np.abs(eyes[:, 0] - ARCFACE_TEMPLATE_112[:2, 0]).max() < 3.0


def test_similarity_transform_recovers_a_known_transform() -> None:
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE_112.astype(np.float64)
    dst = src @ (scale * rot).T + shift
    matrix = similarity_transform(src, dst)
    assert np.allclose(matrix[:, :2], scale * rot, atol=1e-4)
    assert np.allclose(matrix[:, 2], shift, atol=1e-3)


def test_rejects_non_rgb_input(detector: MtcnnDetector) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector.detect([np.zeros((10, 10), dtype=np.uint8)])


def test_fast_path_pyramid_is_a_subset_of_the_full_path() -> None:
    from filter.faces import GENERATED_FAST_PATH, effective_min_face

    size = effective_min_face(GENERATED_FAST_PATH, 160)
    assert size == pytest.approx(20 / 0.709**4)  # largest 20/0.709^k not above 80
    assert effective_min_face(DetectorSettings(), 160) == 20.0


def test_fast_path_finds_the_same_faces_on_generated_images(
    detector: MtcnnDetector, models_dir: object
) -> None:
    from pathlib import Path

    from filter.faces import GENERATED_FAST_PATH, effective_min_face
    from service.generators import latents_for, load_dcgan_digiface

    generator = load_dcgan_digiface(Path(str(models_dir)))
    images = list(generator.generate(np.stack([latents_for(4, s, 0, 100) for s in range(24)])))
    full = detector.detect(images)
    fast = detector.with_settings(GENERATED_FAST_PATH).detect(images)
    assert sum(len(f) for f in full) >= 20
    # On these images each face the fast path finds is a full-path face, box and landmarks
    # alike; it only skips faces far smaller than the frame (min size: half the short side,
    # upscaled). Not on every image: test_leak_proof's FAST_PATH_MISMATCHED_SLOTS are
    # outputs where it keeps another box, which is why it is no longer the served default.
    min_face_64px = effective_min_face(GENERATED_FAST_PATH, 160) * 64 / 160
    # The loops below must have something to check: faces the fast path must find, and did.
    assert sum(f.width >= min_face_64px for faces in full for f in faces) >= 10
    assert sum(len(b) for b in fast) >= 10
    for a, b in zip(full, fast, strict=True):
        large = [f for f in a if f.width >= min_face_64px]
        assert len(b) >= len(large)
        for fb in b:
            assert any(np.allclose(fa.landmarks, fb.landmarks, atol=1e-3) for fa in a)
