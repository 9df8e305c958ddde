"""A face turned on its side or upside down is found (`filter.turned`): MTCNN finds faces
within about 45 degrees of upright, so `facegate check` and `facegate batch` also search
each image at each quarter turn and add the confident faces found there that no face
found upright covers. Without models: a scripted detector stands in for MTCNN. End to end
with the real filter (a turned enrolled face beside a stranger is rejected):
tests/models/test_content_verdicts.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from filter.faces import DetectedFace, DetectorSettings, FaceAligner
from filter.identity_filter import FaceEmbeddingPipeline
from filter.turned import TURNED_MIN_SCORE, TURNS, TurnedDetector, searching_turned, turned_back

HEIGHT, WIDTH = 6, 10


def _face(box: tuple[float, float, float, float], score: float = 1.0) -> DetectedFace:
    x1, y1, x2, y2 = box
    marks = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2], [x1, y2]], dtype=np.float32)
    return DetectedFace(box=box, score=score, landmarks=marks)


@pytest.mark.parametrize("turn", TURNS)
def test_a_point_found_turned_maps_back_to_the_same_pixel(turn: int) -> None:
    image = np.arange(HEIGHT * WIDTH * 3, dtype=np.int64).reshape(HEIGHT, WIDTH, 3)
    turned = np.rot90(image, turn)
    for ty in range(turned.shape[0]):
        for tx in range(turned.shape[1]):
            face = DetectedFace(
                box=(tx, ty, tx, ty), score=1.0, landmarks=np.full((5, 2), (tx, ty), np.float32)
            )
            back = turned_back(face, turn, HEIGHT, WIDTH)
            x, y = (round(float(v)) for v in back.landmarks[0])
            assert (image[y, x] == turned[ty, tx]).all(), (turn, tx, ty)
            assert back.box == (x, y, x, y)


class Scripted:
    """Finds, in an image of the stored shape, `upright`; in a turned copy (told apart by
    its first pixel, which np.rot90 moves), `turned[k]`."""

    settings = DetectorSettings()
    device = "cpu"

    def __init__(self, upright: list[DetectedFace], turned: dict[int, list[DetectedFace]]):
        self.upright, self.turned = upright, turned
        self.calls: list[int] = []

    def searchable(self, height: int, width: int) -> bool:
        return True

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        self.calls.append(len(images))
        out = []
        for image in images:
            corner = int(image[0, 0, 0])
            turn = corner
            out.append(list(self.upright) if turn == 0 else list(self.turned.get(turn, [])))
        return out


def _marked_image() -> np.ndarray:
    """Its top-left pixel says which quarter turn a copy is (0 as stored)."""
    image = np.full((HEIGHT, WIDTH, 3), 9, np.uint8)
    # np.rot90 (counter-clockwise) brings the top-right corner to the top left first.
    image[0, 0], image[0, -1], image[-1, -1], image[-1, 0] = 0, 1, 2, 3
    return image


def test_a_confident_face_found_turned_is_added_in_the_images_pixels() -> None:
    upright = [_face((0, 3, 2, 5))]
    # Found at the top left of the quarter-turned copy: the image's top right.
    found = _face((0, 0, 2, 2))
    inner = Scripted(upright, {1: [found]})
    [faces] = TurnedDetector(inner).detect([_marked_image()])
    assert faces[0] is upright[0]  # the upright faces first, as they were
    assert len(faces) == 2
    assert faces[1].box == turned_back(found, 1, HEIGHT, WIDTH).box == (7.0, 0.0, 9.0, 2.0)
    assert inner.calls == [1, 1, 1, 1]  # as stored, then one call per turn


def test_a_face_found_upright_is_not_added_again_nor_an_unconfident_one() -> None:
    upright = [_face((2, 1, 8, 5))]
    doubtful = _face((0, 0, 2, 2), score=TURNED_MIN_SCORE - 0.01)
    # The upright face, found again in the half-turned copy.
    same = _face(_inverse_box(upright[0].box, 2))
    inner = Scripted(upright, {2: [same], 3: [doubtful]})
    [faces] = TurnedDetector(inner).detect([_marked_image()])
    assert faces == upright


def _inverse_box(
    box: tuple[float, float, float, float], turn: int
) -> tuple[float, float, float, float]:
    """Where a box of the image lies in its copy turned `turn` quarter turns (half turn)."""
    assert turn == 2
    x1, y1, x2, y2 = box
    return (WIDTH - 1 - x2, HEIGHT - 1 - y2, WIDTH - 1 - x1, HEIGHT - 1 - y1)


def test_the_turned_search_keeps_what_an_index_requires_of_the_detector() -> None:
    inner = Scripted([], {})

    class Embedder:
        crop_size = 112

    pipeline = FaceEmbeddingPipeline(FaceAligner(inner, 112), Embedder())  # type: ignore[arg-type]
    turned = searching_turned(pipeline)
    assert isinstance(turned.aligner.detector, TurnedDetector)
    assert turned.aligner.detector.settings is inner.settings  # the manifest's detector
    assert turned.embedder is pipeline.embedder and turned.max_faces == pipeline.max_faces


def test_each_turn_is_searched_as_a_view_of_the_image_not_a_copy() -> None:
    """A turned copy of a 64 MP image is 192 MB held beside it for the whole search; the
    detector copies only the windows it searches (tests/models/test_resolution.py)."""
    seen: list[np.ndarray] = []

    class Recording(Scripted):
        def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
            seen.extend(images)
            return super().detect(images)

    image = _marked_image()
    TurnedDetector(Recording([], {})).detect([image])
    assert len(seen) == 1 + len(TURNS)
    for turn, turned in zip(TURNS, seen[1:], strict=True):
        assert np.shares_memory(turned, image)
        assert np.array_equal(turned, np.rot90(image, turn))
