"""The operator's fast-path setting, apart from the detectors it selects, so that
configuration can be parsed (and a usage error reported) without importing torch."""

from __future__ import annotations

import enum

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
