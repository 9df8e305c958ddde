"""Detection policy: which pyramid scales the filter may skip for generated output, and when.

The generated-output fast path searches only for faces of at least half the frame (see
`DetectorSettings.min_face_fraction`), which halves detection time for face-centred
crops. It cannot see a small face, so it may only be used where the generator provably
emits one face-centred crop per image: by default, only for the embedded generator, whose
agreement with the full path `make bench` measures (`fast_path_agreement`). For any
other generator the operator must turn it on explicitly (`FACEGATE_GENERATED_FAST_PATH=on`)
and accept the risk written in the README: a small enrolled face beside a large one would
be missed.
"""

from __future__ import annotations

import enum
from dataclasses import replace

from filter.faces import DetectorSettings, FaceAligner, MtcnnDetector
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter

GENERATED_FAST_PATH_FRACTION = 0.5
# Generators whose every output is one face-centred crop filling the frame, with the fast
# path's agreement with the full path measured (1.000 on 1000 faces, `make bench`).
FAST_PATH_VERIFIED_GENERATORS = frozenset({"dcgan-digiface"})


class FastPathMode(enum.StrEnum):
    AUTO = "auto"  # only for a verified generator
    ON = "on"  # operator's choice, for any generator
    OFF = "off"


def uses_fast_path(generator_name: str, mode: FastPathMode) -> bool:
    if mode is FastPathMode.OFF:
        return False
    return mode is FastPathMode.ON or generator_name in FAST_PATH_VERIFIED_GENERATORS


def generated_output_settings(
    base: DetectorSettings, generator_name: str, mode: FastPathMode
) -> DetectorSettings:
    if not uses_fast_path(generator_name, mode):
        return base
    return replace(base, min_face_fraction=GENERATED_FAST_PATH_FRACTION)


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
    scoped = FaceEmbeddingPipeline(
        FaceAligner(detector.with_settings(settings), full.embedding.aligner.crop_size),
        full.embedding.embedder,
        full.embedding.max_embed_batch,
    )
    return IdentityFilter(scoped, full.index, full.thresholds, full.no_face_policy)
