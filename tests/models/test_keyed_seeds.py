"""Keyed seeds (issue 9 §1): the latent of (seed, slot, attempt) is a keyed function, so a
caller who knows the seed and the public generator weights cannot regenerate a held-back
candidate offline."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from filter.images import decode_image
from service.config import Settings
from service.errors import StartupError
from service.generators import TorchGenerator, latents_for, load_dcgan_digiface, load_seed_key
from service.pipeline import GenerationRequest
from service.security import seed_key_or_refuse
from tests.conftest import write_seed_key
from tests.fakes import HashListFilter, generation_pipeline

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


@pytest.fixture(scope="module")
def generator(models_dir: Path) -> TorchGenerator:
    return load_dcgan_digiface(models_dir)


def test_keyed_latents_are_deterministic_per_key_and_differ_across_keys() -> None:
    a = latents_for(7, 2, 1, 100, KEY_A)
    assert a.dtype == np.float32 and a.shape == (100,)
    assert np.array_equal(a, latents_for(7, 2, 1, 100, KEY_A))
    assert not np.array_equal(a, latents_for(7, 2, 1, 100, KEY_B))
    assert not np.array_equal(a, latents_for(7, 2, 1, 100))  # not the public function
    for other in ((8, 2, 1), (7, 3, 1), (7, 2, 2)):
        assert not np.array_equal(a, latents_for(*other, 100, KEY_A))
    # Still standard normal: the generator's contract.
    sample = np.stack([latents_for(1, s, 0, 100, KEY_A) for s in range(200)])
    assert abs(float(sample.mean())) < 0.05 and abs(float(sample.std()) - 1.0) < 0.05
    # The largest seed the API accepts.
    assert latents_for(2**64 - 1, 0, 0, 4, KEY_A).shape == (4,)
    with pytest.raises(ValueError, match="32"):
        latents_for(1, 0, 0, 4, b"short")


def test_seed_key_file_must_exist_and_hold_32_bytes(tmp_path: Path) -> None:
    assert load_seed_key(None) is None
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    with pytest.raises(ValueError, match=r"FACEGATE_SEED_KEY_FILE.*31 bytes"):
        load_seed_key(short)
    with pytest.raises(ValueError, match="FACEGATE_SEED_KEY_FILE"):
        load_seed_key(tmp_path / "missing.key")
    good = tmp_path / "seed.key"
    good.write_bytes(KEY_A)
    assert load_seed_key(good) == KEY_A
    with pytest.raises(StartupError, match="31 bytes"):
        seed_key_or_refuse(Settings(seed_key_file=short))  # type: ignore[call-arg]


def test_without_a_key_the_server_refuses_unless_opted_in_and_says_unkeyed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(StartupError, match="FACEGATE_SEED_KEY_FILE is not set"):
        seed_key_or_refuse(Settings())  # type: ignore[call-arg]
    opted_in = Settings(allow_unkeyed_seeds=True, audit_log="none")  # type: ignore[call-arg]
    with caplog.at_level(logging.WARNING, logger="facegate.server"):
        assert seed_key_or_refuse(opted_in) is None
    assert "FACEGATE_ALLOW_UNKEYED_SEEDS=true" in caplog.text
    assert opted_in.public_info()["seeds"] == "unkeyed"
    assert opted_in.public_info()["allow_unkeyed_seeds"] == "True"
    key = write_seed_key(tmp_path, KEY_A)
    info = Settings(seed_key_file=key, index_path=tmp_path / "idx").public_info()  # type: ignore[call-arg]
    assert info["seeds"] == "keyed"
    assert not any(str(tmp_path) in value or "/" in value for value in info.values()), info
    assert info["seed_key_file"] == "set" and info["index_path"] == "set"


def test_keyed_pipeline_same_key_same_bytes_other_key_other_images(
    generator: TorchGenerator,
) -> None:
    async def run() -> None:
        a = generation_pipeline(generator, HashListFilter())
        a.batcher.engine.seed_key = KEY_A
        b = generation_pipeline(generator, HashListFilter())
        b.batcher.engine.seed_key = KEY_B
        unkeyed = generation_pipeline(generator, HashListFilter())
        first = await a.generate(GenerationRequest(count=3, seed=42))
        again = await a.generate(GenerationRequest(count=3, seed=42))
        other = await b.generate(GenerationRequest(count=3, seed=42))
        public = await unkeyed.generate(GenerationRequest(count=3, seed=42))
        assert [i.data for i in first.images] == [i.data for i in again.images]
        assert not {i.data for i in first.images} & {i.data for i in other.images}
        assert not {i.data for i in first.images} & {i.data for i in public.images}
        for pipe in (a, b, unkeyed):
            await pipe.batcher.close()

    asyncio.run(run())


def test_held_back_candidate_cannot_be_regenerated_from_the_seed(
    generator: TorchGenerator,
) -> None:
    """The demo's story under a key: slot 0's first candidate (keyed) is enrolled, so the
    server resamples; regenerating (seed, slot 0, attempt 0) without the key gives another
    image, not the held-back one."""
    checker = HashListFilter()
    held_back = generator.generate(latents_for(1, 0, 0, generator.latent_dim, KEY_A)[None])[0]
    checker.enrolled.add(checker.key(held_back))
    offline = generator.generate(latents_for(1, 0, 0, generator.latent_dim)[None])[0]
    assert checker.key(offline) != checker.key(held_back)

    async def run() -> None:
        pipe = generation_pipeline(generator, checker)
        pipe.batcher.engine.seed_key = KEY_A
        result = await pipe.generate(GenerationRequest(count=2, seed=1))
        assert [(i.slot, i.attempts) for i in result.images] == [(0, 2), (1, 1)]
        released = {checker.key(decode_image(i.data)) for i in result.images}
        assert checker.key(held_back) not in released
        await pipe.batcher.close()

    asyncio.run(run())


def test_demo_index_enrols_keyed_latents(generator: TorchGenerator) -> None:
    """`facegate index demo` and the server draw the same latents under the same key."""
    from service.demo import build_demo_index

    class Recorder:
        def __init__(self) -> None:
            self.latents: list[np.ndarray] = []

        name = "recorder"
        latent_dim = 100
        model_sha256 = "0" * 64

        def generate(self, latents: np.ndarray) -> np.ndarray:
            self.latents.append(latents)
            raise StopIteration  # enough: we only want the latents it was asked for

    recorder = Recorder()
    salt = bytes(range(16))
    with pytest.raises(StopIteration):
        build_demo_index(recorder, None, identities=3, seed=1, seed_key=KEY_A, salt=salt)  # type: ignore[arg-type]
    expected = np.stack([latents_for(1, s, 0, 100, KEY_A, salt) for s in range(3)])
    assert np.array_equal(recorder.latents[0], expected)
