"""Demo identities: faces sampled from the generator, enrolled as if they were training
images, so that a demo (and the tests) can show real rejections and resampling."""

from __future__ import annotations

import numpy as np

from filter.assembly import detector_manifest
from filter.gallery import Enrolment
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex
from filter.index_manifest import new_salt
from service.generators import Generator, latents_for


def build_demo_index(
    generator: Generator,
    pipeline: FaceEmbeddingPipeline,
    *,
    identities: int,
    seed: int,
    seed_key: bytes | None = None,
    salt: bytes | None = None,
) -> FaissIdentityIndex:
    """Enrol the first candidate of slots 0..identities-1 of `seed` (attempt 0).

    The index's salt is chosen first (or given) and the candidates are drawn under it, so
    a request with the same seed (and the server's seed key) against this index meets
    enrolled faces first and must resample.
    """
    keyed = ":keyed" if seed_key is not None else ""
    salt = new_salt() if salt is None else salt
    enrolment = Enrolment(pipeline)
    for start in range(0, identities, 64):
        slots = range(start, min(start + 64, identities))
        latents = np.stack(
            [latents_for(seed, s, 0, generator.latent_dim, seed_key, salt) for s in slots]
        )
        images = generator.generate(latents)
        enrolment.add(
            [
                (
                    f"synthetic-{seed}-{slot:04d}",
                    f"generator:{generator.name}:seed={seed}:slot={slot}:attempt=0{keyed}",
                    image,
                )
                for slot, image in zip(slots, images, strict=True)
            ]
        )
    return enrolment.build(detector_settings=detector_manifest(pipeline), salt=salt)
