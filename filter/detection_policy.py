"""Detection policy: which pyramid scales the filter may skip for generated output, and when.

The generated-output fast path searches only for faces of at least half the frame (see
`DetectorSettings.min_face_fraction`), which halves detection time for face-centred
crops. It cannot see a small face beside a large one, and for some faces it keeps another
box and landmarks than the full pyramid every index is enrolled with, so that an enrolled
image can miss its own enrolment (`make bench`: `fast_path_self_match`). So no generator
uses it by default (`FAST_PATH_VERIFIED_GENERATORS` is empty); an operator turns it on
explicitly (`FACEGATE_GENERATED_FAST_PATH=on`, a startup warning) and accepts the risk
written in the README ("Small faces and the fast path").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from filter.faces import DetectedFace, Detector, DetectorSettings, FaceAligner, MtcnnDetector
from filter.fast_path_mode import (
    FAST_PATH_VERIFIED_GENERATORS,
    GENERATED_FAST_PATH_FRACTION,
    FastPathMode,
    uses_fast_path,
)
from filter.identity_filter import IdentityFilter

__all__ = [
    "FAST_PATH_VERIFIED_GENERATORS",
    "GENERATED_FAST_PATH_FRACTION",
    "FastPathMode",
    "FastPathWithFallback",
    "filter_for_generator",
    "generated_output_settings",
    "uses_fast_path",
]


def generated_output_settings(
    base: DetectorSettings, generator_name: str, mode: FastPathMode
) -> DetectorSettings:
    if not uses_fast_path(generator_name, mode):
        return base
    return replace(base, min_face_fraction=GENERATED_FAST_PATH_FRACTION)


class FastPathWithFallback:
    """The fast path first; an image in which it finds no face is searched again on the
    full pyramid. Without this a candidate holding only a small face would be decided as
    "no face" (and released under the pass policy) without its face ever being checked."""

    def __init__(self, fast: MtcnnDetector, full: Detector) -> None:
        self.fast = fast
        self.full = full
        self.settings = fast.settings

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        found = self.fast.detect(images)
        empty = [i for i, faces in enumerate(found) if not faces]
        if empty:
            again = self.full.detect([images[i] for i in empty])
            for i, faces in zip(empty, again, strict=True):
                found[i] = faces
        return found

    def searchable(self, height: int, width: int) -> bool:
        return self.full.searchable(height, width)


def filter_for_generator(
    full: IdentityFilter, generator_name: str, mode: FastPathMode
) -> IdentityFilter:
    """The same filter (embedder, index, thresholds, alignment) with the detection scope the
    policy allows for this generator's output."""
    detector = full.embedding.aligner.detector
    if not isinstance(detector, MtcnnDetector):
        return full
    settings = generated_output_settings(detector.settings, generator_name, mode)
    if settings == detector.settings:
        return full

    def scope(aligner: FaceAligner) -> FaceAligner:
        lane_detector = aligner.detector
        assert isinstance(lane_detector, MtcnnDetector)  # every lane's is the first's kind
        return FaceAligner(
            FastPathWithFallback(lane_detector.with_settings(settings), lane_detector),
            aligner.crop_size,
        )

    return full.with_embedding(full.embedding.with_aligners(scope))
