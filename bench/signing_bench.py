"""Content credentials' cost: per-image latency and size of a released image, unsigned and
signed (C2PA, ES256), side by side on the same DCGAN faces, as the pipeline releases them
(service.encoding.encode_released). Also the time `facegate verify` takes to read one.

    .venv/bin/python -m bench.signing_bench

The chain is a throwaway one from deploy/c2pa-test-chain.sh. A few seconds in all.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, device_name, emit, generated_faces
from filter.thresholds import FilterInForce, Thresholds
from service.credentials import C2paContentSigner, SigningCredentials, read_credentials
from service.encoding import ContentSigner, ImageFormat, deliver, encode_released
from service.provenance import ReleaseFacts

IMAGES = 64
FACTS = ReleaseFacts(
    "bench",
    FilterInForce(
        "0123456789abcdef", Thresholds(0.571, "index calibration", 0.577, "index calibration")
    ),
)


def _per_image_ms(fn: Callable[[np.ndarray], Any], faces: list[np.ndarray]) -> list[float]:
    times = []
    for face in faces:
        start = time.perf_counter()
        fn(face)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _release(face: np.ndarray, image_format: ImageFormat, signer: ContentSigner | None) -> bytes:
    """As the service releases: a JPEG is encoded (and decoded, for the filter) before the
    check, both counted here; then the checked bytes, signed."""
    pixels, delivered = deliver(face, 90 if image_format is ImageFormat.JPEG else 0)
    return encode_released(pixels, image_format, 90, signer, FACTS, delivered)


def _row(
    image_format: ImageFormat, signer: ContentSigner | None, faces: list[np.ndarray]
) -> dict[str, Any]:
    def release(face: np.ndarray) -> bytes:
        return _release(face, image_format, signer)

    for face in faces[:4]:  # warm-up (first native calls, allocations)
        release(face)
    times = _per_image_ms(release, faces)
    sizes = [len(release(face)) for face in faces]
    return {
        "format": image_format.value,
        "signed": signer is not None,
        "images": len(faces),
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))], 3),
        "mean_bytes": round(statistics.fmean(sizes)),
    }


def run() -> dict[str, Any]:
    faces = generated_faces(IMAGES, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        chain = Path(tmp)
        subprocess.run(
            [str(REPO / "deploy" / "c2pa-test-chain.sh"), str(chain)],
            check=True,
            capture_output=True,
        )
        credentials = SigningCredentials.load(chain / "chain.pem", chain / "signer.key")
    signer = C2paContentSigner(credentials, "dcgan-digiface", "0" * 64)
    summary: dict[str, Any] = {}
    for image_format in (ImageFormat.PNG, ImageFormat.JPEG):
        plain = _row(image_format, None, faces)
        signed = _row(image_format, signer, faces)
        for row in (plain, signed):
            emit({"bench": "signing", "device": device_name(), **row})
        signed_bytes = [_release(f, image_format, signer) for f in faces[:16]]
        verify_times = []
        for data in signed_bytes:
            start = time.perf_counter()
            read_credentials(data, image_format.media_type)
            verify_times.append((time.perf_counter() - start) * 1000)
        verify_ms = statistics.median(verify_times)
        name = image_format.value
        summary |= {
            f"signing_{name}_ms": round(signed["median_ms"] - plain["median_ms"], 3),
            f"signing_{name}_bytes": signed["mean_bytes"] - plain["mean_bytes"],
            f"signing_{name}_size_ratio": round(signed["mean_bytes"] / plain["mean_bytes"], 2),
            f"verify_{name}_ms": round(verify_ms, 3),
        }
    emit({"bench": "signing_summary", "device": device_name(), **summary})
    return summary


if __name__ == "__main__":
    run()
    sys.exit(0)
