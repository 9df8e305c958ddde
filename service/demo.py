"""Demo identities: faces sampled from the generator, enrolled as if they were training
identities, so that a demo (and the tests) can show real rejections and resampling."""

from __future__ import annotations

import numpy as np

from filter.faces import DetectorSettings
from filter.identity_filter import FaceEmbeddingPipeline
from filter.index import FaissIdentityIndex
from service.generators import Generator, latents_for


def build_demo_index(
    generator: Generator, pipeline: FaceEmbeddingPipeline, *, identities: int, seed: int
) -> FaissIdentityIndex:
    """Enrol the first candidate of slots 0..identities-1 of `seed` (attempt 0).

    A request with the same seed therefore meets enrolled faces first and must resample.
    """
    vectors: list[np.ndarray] = []
    labels: list[str] = []
    sources: list[str] = []
    no_face = 0
    for start in range(0, identities, 64):
        slots = range(start, min(start + 64, identities))
        latents = np.stack([latents_for(seed, s, 0, generator.latent_dim) for s in slots])
        results = pipeline.embed_images(list(generator.generate(latents)))
        for slot, result in zip(slots, results, strict=True):
            no_face += not result.faces
            for row in result.embeddings:
                vectors.append(row)
                labels.append(f"synthetic-{seed}-{slot:04d}")
                sources.append(f"generator:{generator.name}:seed={seed}:slot={slot}:attempt=0")
    embedder = pipeline.embedder
    return FaissIdentityIndex.build(
        np.stack(vectors) if vectors else np.zeros((0, embedder.dim), np.float32),
        labels,
        sources,
        embedder_name=embedder.name,
        model_sha256=embedder.model_sha256,
        detector=DetectorSettings().as_dict(),
        counts={"images": identities, "faces": len(vectors), "images_no_face": no_face},
    )
