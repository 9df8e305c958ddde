"""IdentityFilter's decision path with stand-ins for the models and the index: which face's
neighbour is decided for which image, untrusted embeddings, and count mismatches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from filter.decide import DecisionThresholds, NoFacePolicy, Reason
from filter.errors import FilterError
from filter.identity_filter import IdentityFilter, ImageFaces
from filter.vector_table import Match

DIM = 4
ENROLLED = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
STRANGER = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


class FakeEmbedder:
    dim = DIM


class FakeEmbedding:
    """Each image is a list of embeddings: its faces."""

    embedder = FakeEmbedder()

    def embed_images(
        self, images: Sequence[np.ndarray], observer: object = None
    ) -> list[ImageFaces]:
        return [
            ImageFaces(
                faces=[object()] * len(image),  # type: ignore[list-item]
                embeddings=np.asarray(image, np.float32).reshape(len(image), DIM),
            )
            for image in images
        ]


class FakeIndex:
    has_replicas = False

    def __init__(self, drop_one: bool = False) -> None:
        self.drop_one = drop_one
        self.queries: list[np.ndarray] = []

    def search(self, queries: np.ndarray) -> list[Match]:
        self.queries.append(queries)
        matches = [
            Match(similarity=float(q @ ENROLLED), identity="enrolled-1")
            if float(q @ ENROLLED) > 0.5
            else Match(similarity=float(q @ ENROLLED), identity="someone-else")
            for q in queries
        ]
        return matches[:-1] if self.drop_one else matches

    def search_replicas(self, images: Sequence[np.ndarray]) -> list[Match]:
        raise AssertionError("no replica features in this index")


def _filter(index: FakeIndex, policy: NoFacePolicy = NoFacePolicy.REJECT) -> IdentityFilter:
    return IdentityFilter(FakeEmbedding(), index, DecisionThresholds(0.5), policy)  # type: ignore[arg-type]


def test_each_image_is_decided_on_its_own_faces() -> None:
    nan_face = np.full(DIM, np.nan, np.float32)
    images = [
        np.stack([STRANGER, ENROLLED]),  # a second face matches: the image is rejected
        np.stack([nan_face]),  # untrusted: never searched, fails closed
        np.stack([STRANGER]),  # after the untrusted image: must get its own neighbour
        np.zeros((0, DIM), np.float32),  # no face
        np.stack([ENROLLED]),
    ]
    index = FakeIndex()
    verdicts = _filter(index).check(images)  # type: ignore[arg-type]
    assert [v.passed for v in verdicts] == [False, False, True, False, False]
    assert [v.reason for v in verdicts] == [
        Reason.IDENTITY_MATCH,
        Reason.FILTER_ERROR,
        None,
        Reason.NO_FACE,
        Reason.IDENTITY_MATCH,
    ]
    assert verdicts[0].identity == verdicts[4].identity == "enrolled-1"
    assert verdicts[2].identity is None
    (queries,) = index.queries
    assert len(queries) == 4 and np.isfinite(queries).all()  # the NaN face never searched


def test_a_face_exactly_at_the_threshold_is_rejected() -> None:
    at = np.array([0.5, np.sqrt(0.75), 0.0, 0.0], np.float32)
    at /= np.linalg.norm(at)
    at_threshold = DecisionThresholds(float(at @ ENROLLED))
    (verdict,) = IdentityFilter(FakeEmbedding(), FakeIndex(), at_threshold).check(  # type: ignore[arg-type]
        [np.stack([at])]  # type: ignore[list-item]
    )
    assert not verdict.passed and verdict.reason == Reason.IDENTITY_MATCH


def test_no_face_passes_only_under_the_pass_policy() -> None:
    empty = [np.zeros((0, DIM), np.float32)]
    (verdict,) = _filter(FakeIndex(), NoFacePolicy.PASS).check(empty)  # type: ignore[arg-type]
    assert verdict.passed


def test_an_index_answering_fewer_rows_than_asked_fails_closed() -> None:
    with pytest.raises(FilterError, match="result count"):
        _filter(FakeIndex(drop_one=True)).check([np.stack([STRANGER, STRANGER])])  # type: ignore[list-item]


def test_a_replica_index_needs_a_replica_threshold() -> None:
    index = FakeIndex()
    index.has_replicas = True
    with pytest.raises(ValueError, match="replica threshold"):
        IdentityFilter(FakeEmbedding(), index, DecisionThresholds(identity=0.5))  # type: ignore[arg-type]


def test_another_pipeline_keeps_the_index_thresholds_and_policy() -> None:
    """`with_embedding` (a detection scope) resolves nothing again."""
    original = _filter(FakeIndex(), NoFacePolicy.PASS)
    other = FakeEmbedding()
    scoped = original.with_embedding(other)  # type: ignore[arg-type]
    assert scoped is not original and scoped.embedding is other
    assert scoped.index is original.index
    assert scoped.thresholds == original.thresholds == DecisionThresholds(0.5)
    assert scoped.no_face_policy is NoFacePolicy.PASS


def test_thresholds_must_be_resolved() -> None:
    """A bare float is refused: no path around `filter.thresholds.resolve_thresholds`."""
    with pytest.raises(TypeError, match="DecisionThresholds"):
        IdentityFilter(FakeEmbedding(), FakeIndex(), 0.5)  # type: ignore[arg-type]


def test_a_measuring_filter_gives_the_evidence_and_no_verdict() -> None:
    """calibrate and evaluate measure through it: the same evidence as a checking filter,
    and no `check` to ask a verdict of by mistake."""
    from filter.assembly import MeasuringFilter

    images = [np.stack([ENROLLED, STRANGER]), np.stack([STRANGER])]
    measuring = MeasuringFilter(FakeEmbedding(), FakeIndex())  # type: ignore[arg-type]
    measured = measuring.evidence(images)
    checked = _filter(FakeIndex()).evidence(images)
    assert [[m.identity for m in e.face_matches] for e in measured] == [
        [m.identity for m in e.face_matches] for e in checked
    ]
    assert [m.identity for m in measured[0].face_matches] == ["enrolled-1", "someone-else"]
    assert not hasattr(measuring, "check")
