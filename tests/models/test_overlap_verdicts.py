"""With the real models, checks with two batches in flight (sharing one lane's stages, or
in two lanes) give the serial verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from filter.assembly import build_embedding_pipeline, load_index_for
from filter.detection_policy import filter_for_generator
from filter.fast_path_mode import FastPathMode
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


def test_two_lanes_give_the_verdicts_of_one(models_dir: Path, demo_index: Path) -> None:
    """Real models in two lanes, one core each (the server's default on 2 cores), checked
    with two batches in flight: the verdicts of one lane checking every batch in turn on
    the same threads. The fast-path scope (the operator's opt-in) keeps both lanes. (The
    threads the lanes set are put back after the test: tests/conftest.py.)"""
    laned = build_embedding_pipeline("sface", models_dir, lanes=2, threads_per_lane=1)
    assert laned.lanes == 2 and torch.get_num_threads() == 1
    one_lane = FaceEmbeddingPipeline(laned.aligner, laned.embedder)
    index = load_index_for(laned, demo_index)
    thresholds = pinned_thresholds(index, 0.56)
    generator = load_dcgan_digiface(models_dir)
    latents = np.stack([latents_for(1, slot, 0, generator.latent_dim) for slot in range(24)])
    batches = [list(generator.generate(latents[i : i + 6])) for i in range(0, 24, 6)]
    serial = [IdentityFilter(one_lane, index, thresholds).check(b) for b in batches]
    # The second lane's own networks and embedder, alone, give the first's verdicts.
    second = laned._lanes[1]
    second_lane = FaceEmbeddingPipeline(second.aligner, second.embedder)
    assert second.embedder is not laned.embedder
    assert [IdentityFilter(second_lane, index, thresholds).check(b) for b in batches] == serial
    checker = IdentityFilter(laned, index, thresholds)
    side_by_side = list(overlapped(checker.check, batches, depth=2))
    assert side_by_side == serial
    assert any(not v.passed for batch in serial for v in batch)  # the run decides both ways
    scoped = filter_for_generator(checker, generator.name, FastPathMode.ON)
    assert scoped is not checker and scoped.embedding.lanes == 2
