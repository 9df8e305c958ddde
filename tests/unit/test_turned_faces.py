"""A face turned on its side or upside down is searched too (`filter.file_check.TURNS`):
MTCNN finds faces within about 45 degrees of upright, so `facegate check` and `facegate
batch` also search each image turned by each quarter turn. Without models: a checker that
matches one exact array shows which copies were searched and how their verdicts count.
End to end with the real filter: tests/models/test_content_verdicts.py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from filter.content import FileContent, ImageView
from filter.decide import ImageVerdict, Reason
from filter.file_check import TURNS, check_files
from tests.fakes import HashListFilter


def _content(*views: np.ndarray) -> FileContent:
    return FileContent("PNG", tuple(ImageView(f"view {i}", v) for i, v in enumerate(views)), 1)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def test_a_face_enrolled_as_turned_is_found_at_each_quarter_turn() -> None:
    image = _image(1)
    for turn in TURNS:
        checker = HashListFilter()
        # The stored image shows the enrolled face turned back by `turn` quarter turns.
        checker.enrolled.add(HashListFilter.key(np.ascontiguousarray(np.rot90(image, turn))))
        [result] = check_files(checker, [_content(_image(0), image)])
        assert (result.verdict.reason, result.part) == (Reason.IDENTITY_MATCH, "view 1"), turn
        assert result.detail == f"view 1: turned {90 * turn} degrees"
        assert checker.batches == [2, 2, 2, 2]  # as stored, then three turns, one call each
    unturned = HashListFilter()
    unturned.enrolled.add(HashListFilter.key(np.ascontiguousarray(np.rot90(image, 1))))
    [result] = check_files(unturned, [_content(image)], turns=())
    assert result.passed  # what the turns add


class _UprightOnly:
    """Finds a face (and passes) only in arrays of the stored shape; anything turned
    shows no face, fails or has too many, as scripted."""

    def __init__(self, turned: ImageVerdict) -> None:
        self.turned = turned

    def check(self, images: Sequence[np.ndarray]) -> list[ImageVerdict]:
        return [
            ImageVerdict(passed=True, reason=None, faces=1, max_similarity=0.1, identity=None)
            if image.shape[0] < image.shape[1] or image.shape[0] == 24
            else self.turned
            for image in images
        ]


def test_a_turned_copy_adds_only_matches_and_searches_that_did_not_complete() -> None:
    no_face = ImageVerdict(
        passed=False, reason=Reason.NO_FACE, faces=0, max_similarity=None, identity=None
    )
    [result] = check_files(_UprightOnly(no_face), [_content(_image(2))], turns=(1,))
    assert result.passed  # an upright face is seldom found turned: says nothing
    for reason in (Reason.FILTER_ERROR, Reason.TOO_MANY_FACES):
        failed = ImageVerdict(
            passed=False, reason=reason, faces=0, max_similarity=None, identity=None
        )
        [result] = check_files(_UprightOnly(failed), [_content(_image(2))], turns=(1,))
        assert result.verdict.reason is reason  # fail closed
