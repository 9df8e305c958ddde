"""The operator's fast-path setting, apart from the detectors it selects, so that
configuration can be parsed (and a usage error reported) without importing torch."""

from __future__ import annotations

import enum

GENERATED_FAST_PATH_FRACTION = 0.5
# Generators on whose output the fast path finds what the full pyramid finds, so that an
# enrolled output is matched at its own enrolment (indexes are enrolled on the full
# pyramid). None: the embedded generator was listed after a verdict agreement of 1.000 on
# 1000 faces, but the fast path keeps other boxes and landmarks than the full pyramid for
# some of its faces: of 1,977 of its outputs enrolled as training images, 2 would have
# passed the identity signal at 0.56 (`make bench`, `fast_path_self_match`; README "Small
# faces and the fast path"), where the full pyramid matches every one at 1.0.
FAST_PATH_VERIFIED_GENERATORS: frozenset[str] = frozenset()


class FastPathMode(enum.StrEnum):
    AUTO = "auto"  # only for a verified generator (none today: the full pyramid)
    ON = "on"  # operator's choice, for any generator
    OFF = "off"


def uses_fast_path(generator_name: str, mode: FastPathMode) -> bool:
    if mode is FastPathMode.OFF:
        return False
    return mode is FastPathMode.ON or generator_name in FAST_PATH_VERIFIED_GENERATORS
