"""With the real models, checks with two batches in flight give the serial verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from filter.assembly import load_index_for
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.overlap import overlapped
from filter.thresholds import pinned_thresholds
from service.generators import latents_for, load_dcgan_digiface


def test_overlapped_checks_give_the_serial_verdicts(
    models_dir: Path, demo_index: Path, pipeline: FaceEmbeddingPipeline
) -> None:
    """Real models: generated candidates (seed 1 meets enrolled faces, so some are
    rejected) checked in three batches serially and with two batches in flight."""
    generator = load_dcgan_digiface(models_dir)
    latents = np.stack([latents_for(1, slot, 0, generator.latent_dim) for slot in range(24)])
    images = list(generator.generate(latents))
    checker = IdentityFilter(
        pipeline,
        load_index_for(pipeline, demo_index),
        pinned_thresholds(load_index_for(pipeline, demo_index), 0.56),
    )
    batches = [images[i : i + 8] for i in range(0, 24, 8)]
    serial = [checker.check(batch) for batch in batches]
    piped = list(overlapped(checker.check, batches, depth=2))
    assert piped == serial
    assert any(not v.passed for batch in serial for v in batch)  # the run decides both ways
