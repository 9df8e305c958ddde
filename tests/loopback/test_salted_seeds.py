"""Issue 20 §2: seeds that cannot be replayed across membership changes.

Each index carries a random salt in its manifest, chosen before `index demo` enrols
anything, rolled by `index add` and `index remove`, kept by `calibrate --save` and
`index publish`. A latent comes from (key, salt, seed, slot, attempt), drawn under the salt
of the very filter that checks the candidate: after a hot reload a seed maps to new
candidates exactly when the membership changed."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from filter.decide import ImageVerdict
from filter.errors import IndexCorruptError
from filter.index import FaissIdentityIndex
from service.engine import CandidateEngine
from service.generators import draw_rows, latents_for, latents_for_draws
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from service.reload import SwappableChecker
from tests.commands import facegate
from tests.conftest import write_seed_key
from tests.servers import InProcessServer, scrape, settings_for, wait_until

KEY = bytes(range(32))


def test_the_salt_changes_every_latent_and_is_bound_to_the_key() -> None:
    salt_a, salt_b = bytes(range(16)), bytes(range(1, 17))
    a = latents_for(7, 2, 1, 100, KEY, salt_a)
    assert np.array_equal(a, latents_for(7, 2, 1, 100, KEY, salt_a))
    for other in (
        latents_for(7, 2, 1, 100, KEY, salt_b),  # another salt
        latents_for(7, 2, 1, 100, KEY),  # no salt (an index made before salts)
        latents_for(7, 2, 1, 100, None, salt_a),  # no key
        latents_for(7, 2, 1, 100, bytes(range(1, 33)), salt_a),  # another key
    ):
        assert not np.array_equal(a, other)
    # Still standard normal: the generator's contract.
    sample = np.stack([latents_for(1, s, 0, 100, KEY, salt_a) for s in range(200)])
    assert abs(float(sample.mean())) < 0.05 and abs(float(sample.std()) - 1.0) < 0.05
    # Rows of draws give the same latents, up to the largest seed the API accepts.
    rows = draw_rows(2**64 - 1, [(0, 0), (3, 2)])
    assert rows.dtype == np.uint64 and rows.shape == (2, 4)
    assert int(rows[0, 0]) == 2**64 - 1 and rows[:, 3].tolist() == [0, 0]  # lossless
    # PNG rows keep their latents: those of `latents_for` without a delivery.
    png = latents_for_draws(rows, 100, KEY, salt_a)
    assert np.array_equal(png[1], latents_for(2**64 - 1, 3, 2, 100, KEY, salt_a))


def test_each_jpeg_quality_draws_other_candidates_than_png() -> None:
    """A JPEG candidate is held back for its decoded view too: were it the PNG candidate of
    the same seed, slot and attempt, a caller who got that PNG would encode the held-back
    JPEG himself, and learn per quality whether it passes."""
    salt = bytes(range(16))
    slots = [(0, 0), (3, 2)]
    png = latents_for_draws(draw_rows(9, slots), 100, KEY, salt)
    by_quality = {}
    for quality in (20, 75, 90, 100):
        rows = draw_rows(9, slots, jpeg_quality=quality)
        assert rows[:, 3].tolist() == [quality, quality]
        latents = latents_for_draws(rows, 100, KEY, salt)
        assert np.array_equal(latents, latents_for_draws(rows, 100, KEY, salt))  # reproducible
        assert not np.isin(latents, png).any()
        by_quality[quality] = latents
        assert np.array_equal(latents[1], latents_for(9, 3, 2, 100, KEY, salt, delivery=quality))
        # Keyed and salted as lossless draws are.
        assert not np.array_equal(latents, latents_for_draws(rows, 100, bytes(range(1, 33)), salt))
        assert not np.array_equal(latents, latents_for_draws(rows, 100, KEY, salt[::-1]))
        assert not np.array_equal(latents, latents_for_draws(rows, 100, None, salt))
    distinct = {latents.tobytes() for latents in by_quality.values()}
    assert len(distinct) == len(by_quality)
    sample = np.stack([latents_for(1, s, 0, 100, KEY, salt, delivery=90) for s in range(200)])
    assert abs(float(sample.mean())) < 0.05 and abs(float(sample.std()) - 1.0) < 0.05


def test_every_index_gets_its_own_salt_and_a_malformed_one_is_refused(
    full_index: Path, tmp_path: Path
) -> None:
    index = FaissIdentityIndex.load(full_index)
    assert len(index.salt) == 16 and index.manifest["salt"] == index.salt.hex()
    twin = FaissIdentityIndex.build(
        index.vectors(),
        index.faces.identities,
        index.faces.sources,
        embedder_name="sface",
        model_sha256=index.manifest["embedder"]["model_sha256"],
        detector=index.manifest["detector"],
    )
    assert twin.salt != index.salt  # the same members built twice: two salts
    for bad in ("not-hex", "abcd", 7):
        copy = tmp_path / f"bad-{bad}"
        shutil.copytree(full_index, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["salt"] = bad
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(IndexCorruptError, match="salt"):
            FaissIdentityIndex.load(copy)
    legacy = tmp_path / "legacy"
    shutil.copytree(full_index, legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["salt"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert FaissIdentityIndex.load(legacy).salt == b""  # loads; seeds as before salts


class Recording:
    """Generator and checker stand-ins: what each batch was drawn as, who checked it."""

    name = "recording"
    latent_dim = 8
    model_sha256 = "0" * 64

    def __init__(self) -> None:
        self.latents: list[np.ndarray] = []

    def generate(self, latents: np.ndarray) -> np.ndarray:
        self.latents.append(np.array(latents))
        return np.zeros((len(latents), 4, 4, 3), dtype=np.uint8)


class Named:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def check(
        self,
        images: Sequence[np.ndarray],
        observer: Any = None,
        candidates: Sequence[int] | None = None,
    ) -> list[ImageVerdict]:
        self.log.append(self.name)
        return [ImageVerdict(True, None, 1, 0.1, None) for _ in images]


def test_a_batch_is_drawn_under_the_salt_of_the_filter_that_checks_it() -> None:
    """The snapshot is read once per batch: after a swap, the next batch's latents come
    from the new index's salt, and that index's filter checks them."""
    checked: list[str] = []
    salt_a, salt_b = b"a" * 16, b"b" * 16
    swappable = SwappableChecker(Named("A", checked), None, salt_a)
    generator = Recording()
    engine = CandidateEngine(generator, swappable, seed_key=KEY)  # type: ignore[arg-type]
    draws = draw_rows(5, [(0, 0), (1, 0)])
    engine.run(draws)
    swappable.swap(Named("B", checked), None, salt_b)
    engine.run(draws)
    assert checked == ["A", "B"]
    for drawn, salt in zip(generator.latents, (salt_a, salt_b), strict=True):
        expected = np.stack([latents_for(5, slot, 0, 8, KEY, salt) for slot in (0, 1)])
        assert np.array_equal(drawn, expected)


def test_the_pipeline_draws_through_the_engine() -> None:
    """GenerationPipeline hands the batcher (seed, slot, attempt) rows, never latents."""
    from service.batcher import DynamicBatcher
    from service.pipeline import GenerationPipeline, GenerationRequest

    generator = Recording()
    engine = CandidateEngine(
        generator,  # type: ignore[arg-type]
        SwappableChecker(Named("A", []), None, b"s" * 16),
        seed_key=KEY,
    )

    async def run() -> None:
        batcher = DynamicBatcher(engine, max_batch=8, max_delay=0.001)
        pipe = GenerationPipeline(batcher, 8, max_attempts=2, max_count=4)
        await pipe.generate(GenerationRequest(count=2, seed=11))
        await batcher.close()

    asyncio.run(run())
    expected = np.stack([latents_for(11, slot, 0, 8, KEY, b"s" * 16) for slot in (0, 1)])
    assert np.array_equal(generator.latents[0], expected)


# --- the operator's commands and a live server ------------------------------------------


def _salt(index: Path) -> str | None:
    return json.loads((index / "manifest.json").read_text()).get("salt")  # type: ignore[no-any-return]


def _fingerprint(index: Path) -> str:
    return FaissIdentityIndex.load(index).fingerprint


def _live_fingerprint(server: InProcessServer) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(scrape(server.metrics_url)):
        for sample in family.samples:
            if sample.name == "facegate_index_info":
                return str(sample.labels["fingerprint"])
    raise KeyError("facegate_index_info")


def _publish(source: Path, link: Path) -> None:
    result = facegate("index", "publish", str(source), str(link))
    assert result.returncode == 0, result.stderr


def _generate(server: InProcessServer, seed: int) -> pb.GenerateResponse:
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(count=4, seed=seed), timeout=120
        )


def test_a_seed_maps_to_new_candidates_exactly_when_the_membership_changes(
    tmp_path: Path, identities_dir: Path
) -> None:
    """`make run`'s path through the CLI (index demo, calibrate --save), served from a link
    that the file watch follows: the demo keeps its promise (seed 1 meets enrolled faces
    first); a recalibrated republish keeps every seed's images; removing one identity, far
    from the seed used, gives that seed all new images; so does adding one. The identity
    threshold is pinned (FACEGATE_THRESHOLD), so that only the candidates can change."""
    key_file = write_seed_key(tmp_path)
    env = {"FACEGATE_SEED_KEY_FILE": str(key_file)}
    demo = tmp_path / "demo"
    built = facegate("index", "demo", "--out", str(demo), "--identities", "8", env=env)
    assert built.returncode == 0, built.stderr
    salt = _salt(demo)
    assert salt is not None and len(bytes.fromhex(salt)) == 16

    def calibrate(index: Path, target: str) -> None:
        result = facegate(
            "calibrate", "--index", str(index), "--generator-samples", "24", "--seed", "2",
            "--target-false-reject", target, "--save", "--allow-looser", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    calibrate(demo, "0.1")
    assert _salt(demo) == salt  # calibrate --save keeps it
    link = tmp_path / "index" / "current"
    _publish(demo, link)
    assert _salt(link) == salt  # publish copies it as it is
    running = InProcessServer(
        settings_for(link, tmp_path, seed_key_file=key_file, index_watch_seconds=0.2)
    )
    try:
        first = _generate(running, seed=1)
        # The demo's promise: index demo enrolled seed 1's first candidates under the
        # salt it saved, so every slot here met an enrolled face first.
        assert all(image.attempts >= 2 for image in first.images), first.summary
        before = _generate(running, seed=7)

        # Recalibrated (another fingerprint, the same members): the same candidates.
        recalibrated = tmp_path / "recalibrated"
        shutil.copytree(demo, recalibrated)
        calibrate(recalibrated, "0.2")
        assert _salt(recalibrated) == salt
        assert _fingerprint(recalibrated) != _fingerprint(demo)
        _publish(recalibrated, link)
        wait_until(lambda: _live_fingerprint(running) == _fingerprint(recalibrated), "reload")
        same = _generate(running, seed=7)
        assert [i.data for i in same.images] == [i.data for i in before.images]
        assert [i.attempts for i in same.images] == [i.attempts for i in before.images]

        # One identity removed, one that seed 7's candidates never met: new images anyway.
        removed = tmp_path / "removed"
        labels = json.loads((recalibrated / "labels.json").read_text())
        result = facegate(
            "index", "remove", str(recalibrated), "--identity", labels[-1]["identity"],
            "--out", str(removed),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        _publish(removed, link)
        wait_until(lambda: _live_fingerprint(running) == _fingerprint(removed), "reload")
        after_remove = _generate(running, seed=7)
        assert not {i.data for i in before.images} & {i.data for i in after_remove.images}
        assert _salt(removed) != salt

        # An identity added: the salt rolls again.
        added = tmp_path / "added"
        gallery = tmp_path / "optout" / "id04"
        gallery.mkdir(parents=True)
        for photo in sorted((identities_dir / "id04").glob("*.jpg"))[:2]:
            (gallery / photo.name).symlink_to(photo)
        result = facegate(
            "index", "add", str(removed), str(gallery.parent), "--out", str(added), env=env
        )
        assert result.returncode == 0, result.stderr
        _publish(added, link)
        wait_until(lambda: _live_fingerprint(running) == _fingerprint(added), "reload")
        after_add = _generate(running, seed=7)
        assert not {i.data for i in after_remove.images} & {i.data for i in after_add.images}
        assert _salt(added) not in (salt, _salt(removed))
    finally:
        running.stop()
