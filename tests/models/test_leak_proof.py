"""The filter's promise with real models: no fail-open path, every face checked, replicas
caught, verdicts independent of batch neighbours, calibration carried by the index."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from filter.assembly import detector_manifest
from filter.decide import DecisionThresholds, NoFacePolicy, Reason
from filter.detection_policy import FastPathMode, filter_for_generator
from filter.errors import FilterError
from filter.evaluate import EvaluationPlan, evaluate_generated, evaluate_leave_one_out
from filter.gallery import Enrolment, build_gallery_index
from filter.identity_filter import FaceEmbeddingPipeline, IdentityFilter
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from filter.thresholds import pinned_thresholds, resolve_thresholds
from service.config import Settings
from service.generators import latents_for, load_dcgan_digiface
from service.proto.facegate.v1 import generation_pb2 as pb
from service.proto.facegate.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import FAST_PATH_MISMATCHED_SLOTS, REPO, make_gallery, write_seed_key
from tests.fakes import FixedFrame
from tests.servers import InProcessServer, metric_value, scrape


class PoisonedEmbedder:
    """The real embedder, except that chosen rows of each call come back as NaN."""

    def __init__(self, real: object, poisoned_rows: set[int]) -> None:
        self._real = real
        self._rows = poisoned_rows
        for name in ("name", "dim", "crop_size", "model_sha256"):
            setattr(self, name, getattr(real, name))

    def embed(self, crops: np.ndarray) -> np.ndarray:
        out = self._real.embed(crops).copy()  # type: ignore[attr-defined]
        for row in self._rows:
            if row < len(out):
                out[row] = np.nan
        return out


@pytest.fixture(scope="module")
def id01_index(
    tmp_path_factory: pytest.TempPathFactory, identities_dir: Path, pipeline: FaceEmbeddingPipeline
) -> FaissIdentityIndex:
    root = tmp_path_factory.mktemp("id01")
    gallery = make_gallery(identities_dir, root / "gallery", ["id01", "id02"])
    index, _ = build_gallery_index(gallery, pipeline, detector_settings=detector_manifest(pipeline))
    return index


@pytest.fixture(scope="module")
def generator(models_dir: Path):  # type: ignore[no-untyped-def]
    return load_dcgan_digiface(models_dir)


def test_a_nan_embedding_rejects_only_its_own_image(
    pipeline: FaceEmbeddingPipeline, id01_index: FaissIdentityIndex, identities_dir: Path
) -> None:
    photos = [decode_image(identities_dir / i / "01.jpg") for i in ("id05", "id06", "id07")]
    clean = IdentityFilter(pipeline, id01_index, pinned_thresholds(id01_index, 0.40)).check(photos)
    assert [v.faces for v in clean] == [1, 1, 1] and all(v.passed for v in clean)
    poisoned = FaceEmbeddingPipeline(pipeline.aligner, PoisonedEmbedder(pipeline.embedder, {1}))
    verdicts = IdentityFilter(poisoned, id01_index, pinned_thresholds(id01_index, 0.40)).check(
        photos
    )
    assert [v.passed for v in verdicts] == [True, False, True]
    assert verdicts[1].reason is Reason.FILTER_ERROR and "not finite" in (verdicts[1].detail or "")


def test_a_training_face_with_a_broken_embedding_is_not_enrolled(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path
) -> None:
    """An enrolled face that matches nothing would let its person out: refuse the build."""
    poisoned = FaceEmbeddingPipeline(pipeline.aligner, PoisonedEmbedder(pipeline.embedder, {0}))
    enrolment = Enrolment(poisoned)
    photo = decode_image(identities_dir / "id01" / "01.jpg")
    with pytest.raises(FilterError, match="not finite"):
        enrolment.add([("id01", "id01/01.jpg", photo)])


def test_a_thin_image_gets_a_verdict_and_the_batch_goes_on(
    pipeline: FaceEmbeddingPipeline, id01_index: FaissIdentityIndex, identities_dir: Path
) -> None:
    thin = np.full((10, 1000, 3), 128, dtype=np.uint8)
    tall = np.full((1000, 12, 3), 90, dtype=np.uint8)
    member = decode_image(identities_dir / "id01" / "02.jpg")
    verdicts = IdentityFilter(
        pipeline, id01_index, pinned_thresholds(id01_index, 0.40), NoFacePolicy.PASS
    ).check([thin, member, tall])
    assert verdicts[0].reason is Reason.UNSUPPORTED_GEOMETRY and not verdicts[0].passed
    assert verdicts[2].reason is Reason.UNSUPPORTED_GEOMETRY and not verdicts[2].passed
    assert verdicts[1].reason is Reason.IDENTITY_MATCH


def _composite(identities_dir: Path) -> np.ndarray:
    """A 256x256 frame: a large stranger's face, and a small enrolled person in a corner."""
    import cv2

    stranger = decode_image(identities_dir / "id05" / "01.jpg")
    member = decode_image(identities_dir / "id01" / "02.jpg")
    frame = cv2.resize(stranger, (256, 256), interpolation=cv2.INTER_AREA)
    small = cv2.resize(member, (84, 84), interpolation=cv2.INTER_AREA)
    frame[256 - 84 :, 256 - 84 :] = small
    return np.ascontiguousarray(frame)


def test_a_small_enrolled_face_beside_a_large_one_is_caught_for_any_other_generator(
    pipeline: FaceEmbeddingPipeline, id01_index: FaissIdentityIndex, identities_dir: Path
) -> None:
    frame = _composite(identities_dir)
    full = IdentityFilter(pipeline, id01_index, pinned_thresholds(id01_index, 0.40))
    assert full.check([frame])[0].reason is Reason.IDENTITY_MATCH
    # The policy keeps the full pyramid for a generator it has not verified...
    served = filter_for_generator(full, "torchscript:custom.pt", FastPathMode.AUTO)
    verdict = served.check([frame])[0]
    assert verdict.reason is Reason.IDENTITY_MATCH and verdict.faces >= 2
    # ...and only an operator's explicit choice narrows it (the documented risk).
    narrowed = filter_for_generator(full, "torchscript:custom.pt", FastPathMode.ON)
    assert narrowed.embedding.aligner.detector is not full.embedding.aligner.detector
    assert filter_for_generator(full, "dcgan-digiface", FastPathMode.OFF) is full


def test_the_fast_path_falls_back_to_the_full_pyramid_when_it_finds_no_face(
    pipeline: FaceEmbeddingPipeline, id01_index: FaissIdentityIndex, identities_dir: Path
) -> None:
    """A frame holding only a small enrolled face: the fast path (large faces only) sees
    nothing, so the full pyramid must search it, whatever the no-face policy."""
    import cv2

    member = decode_image(identities_dir / "id01" / "02.jpg")
    frame = np.full((256, 256, 3), 200, dtype=np.uint8)
    frame[256 - 84 :, 256 - 84 :] = cv2.resize(member, (84, 84), interpolation=cv2.INTER_AREA)
    full = IdentityFilter(
        pipeline, id01_index, pinned_thresholds(id01_index, 0.40), NoFacePolicy.PASS
    )
    narrowed = filter_for_generator(full, "torchscript:custom.pt", FastPathMode.ON)
    fast_only = narrowed.embedding.aligner.detector.fast  # type: ignore[attr-defined]
    assert fast_only.detect([frame]) == [[]]  # the fast path alone would see no face
    verdict = narrowed.check([frame])[0]
    assert verdict.reason is Reason.IDENTITY_MATCH and not verdict.passed


def test_an_enrolled_generator_output_matches_its_own_enrolment_as_served(
    pipeline: FaceEmbeddingPipeline, generator: object
) -> None:
    """A generator that reproduces a training image byte for byte is the case this product
    exists for: the served filter must detect it as enrolment did. The demo and the
    loopback tests enrol generator outputs the same way."""
    latents = np.stack([latents_for(1, slot, 0, 100) for slot in FAST_PATH_MISMATCHED_SLOTS])
    images = list(generator.generate(latents))  # type: ignore[attr-defined]
    enrolment = Enrolment(pipeline)
    enrolment.add(
        [
            (f"slot-{s}", f"slot-{s}.png", image)
            for s, image in zip(FAST_PATH_MISMATCHED_SLOTS, images, strict=True)
        ]
    )
    index = enrolment.build(detector_settings=detector_manifest(pipeline))
    full = IdentityFilter(pipeline, index, pinned_thresholds(index, 0.40), NoFacePolicy.REJECT)
    served = filter_for_generator(full, "dcgan-digiface", FastPathMode.AUTO)
    verdicts = served.check(images)
    assert [v.identity for v in verdicts] == [f"slot-{s}" for s in FAST_PATH_MISMATCHED_SLOTS]
    for verdict in verdicts:
        assert verdict.reason is Reason.IDENTITY_MATCH and not verdict.passed
        assert verdict.max_similarity is not None and verdict.max_similarity > 0.999
    # The probes are still probes: the opt-in fast path detects at least one of them another
    # way (0.12-0.57 where they were found; 0.9 leaves room for another CPU's kernels).
    narrowed = filter_for_generator(full, "dcgan-digiface", FastPathMode.ON)
    scores = [v.max_similarity or 0.0 for v in narrowed.check(images)]
    assert min(scores) < 0.9


def test_verdicts_do_not_depend_on_batch_neighbours(
    pipeline: FaceEmbeddingPipeline, id01_index: FaissIdentityIndex, generator: object
) -> None:
    latents = np.stack([latents_for(77, slot, 0, 100) for slot in range(64)])
    images = list(generator.generate(latents))  # type: ignore[attr-defined]
    served = filter_for_generator(
        IdentityFilter(
            pipeline, id01_index, pinned_thresholds(id01_index, 0.40), NoFacePolicy.REJECT
        ),
        "dcgan-digiface",
        FastPathMode.AUTO,
    )
    together = served.check(images)
    alone = [served.check([image])[0] for image in images]
    assert sum(v.faces for v in together) >= 55
    for batched, single in zip(together, alone, strict=True):
        assert (batched.passed, batched.reason, batched.faces) == (
            single.passed,
            single.reason,
            single.faces,
        )
        assert np.allclose(batched.face_similarities, single.face_similarities, atol=1e-5)
        assert batched.replica_similarity == pytest.approx(single.replica_similarity, abs=1e-5)


def test_a_replica_of_a_training_image_is_caught_when_its_face_is_not(
    pipeline: FaceEmbeddingPipeline, generator: object
) -> None:
    latents = np.stack([latents_for(5, slot, 0, 100) for slot in range(48)])
    gallery = generator.generate(latents)  # type: ignore[attr-defined]
    enrolment = Enrolment(pipeline)
    enrolment.add([(f"g{slot}", f"slot{slot}", image) for slot, image in enumerate(gallery)])
    index = enrolment.build(detector_settings=detector_manifest(pipeline))
    noise = np.random.default_rng(1).standard_normal(latents.shape).astype(np.float32)
    near = generator.generate(latents + 0.1 * noise)  # type: ignore[attr-defined]
    fresh = generator.generate(  # type: ignore[attr-defined]
        np.stack([latents_for(6, slot, 0, 100) for slot in range(48)])
    )
    # Identity signal off (threshold 1.0): only the replica signal can reject.
    thresholds = resolve_thresholds(index, identity_override=1.0)
    assert thresholds.replica_source == "default"
    replica_only = IdentityFilter(pipeline, index, thresholds.decision, NoFacePolicy.PASS)
    near_verdicts = replica_only.check(list(near))
    caught = [v for v in near_verdicts if v.reason is Reason.REPLICA]
    assert len(caught) >= 0.9 * len(near)
    assert all(v.identity is not None and v.identity.startswith("g") for v in caught)
    fresh_rejected = [v for v in replica_only.check(list(fresh)) if v.reason is Reason.REPLICA]
    assert len(fresh_rejected) <= 0.05 * len(fresh)


def test_leave_one_out_real_photos_at_the_default_thresholds(
    pipeline: FaceEmbeddingPipeline, identities_dir: Path
) -> None:
    report = evaluate_leave_one_out(identities_dir, pipeline)
    assert report.enrolled_photos >= 25 and report.stranger_photos >= 30
    assert report.missed == [], "an enrolled person's other photo was released"
    assert report.false_rejects == [], "a photo of someone not enrolled was rejected"
    assert "identity 0.4 (default)" in report.thresholds


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 4,000 generated images through the whole filter
def test_copy_recall_at_the_calibrated_false_reject_rate(
    pipeline: FaceEmbeddingPipeline, generator: object
) -> None:
    """Issue 23's targets at a 5 % false-reject target: near-copies, and copies changed by
    the augmentations generators are trained with (filter.augment), one set of 200 each."""
    plan = EvaluationPlan(
        gallery=200,
        near_copies=200,
        sigmas=(0.2, 0.3),
        calibration=600,
        test=600,
        seed=4242,
        transformed=200,
    )
    evaluation, _ = evaluate_generated(
        generator.generate,  # type: ignore[attr-defined]
        lambda seed, slot: latents_for(seed, slot, 0, 100),
        pipeline,
        plan,
    )
    lines = {str(line["set"]): line for line in evaluation.lines()}

    def recall(name: str) -> float:
        return float(lines[name]["recall"])  # type: ignore[arg-type]

    assert recall("near_copies_sigma_0.2") >= 0.97
    # Format 2's feature measured 0.974 at sigma 0.3 (README); the views must not cost it.
    assert recall("near_copies_sigma_0.3") >= 0.96
    assert recall("copies_mirrored") >= 0.99
    for name in ("crop_center_85", "crop_random_15", "shift_15", "mirrored_crop_15"):
        assert recall(f"copies_{name}") >= 0.97, name
    for name in ("rotate_5", "brightness_10", "contrast_10", "jpeg", "webp", "augmented"):
        assert recall(f"copies_{name}") >= 0.97, name
    # 5 % targeted on the calibration set; 600 fresh samples measure it within ~2 points.
    assert float(lines["fresh_test"]["false_reject"]) <= 0.07  # type: ignore[arg-type]
    assert evaluation.thresholds.replica is not None
    assert math.isfinite(evaluation.thresholds.identity)
    assert isinstance(evaluation.thresholds, DecisionThresholds)


def _serve_one(settings: Settings) -> tuple[grpc.StatusCode, str]:
    running = InProcessServer(settings)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            try:
                stub.Generate(pb.GenerateRequest(count=1, seed=3), timeout=120)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        return code, scrape(running.metrics_url)
    finally:
        running.stop()


def test_the_server_holds_back_a_small_enrolled_face_from_a_custom_generator(
    id01_index: FaissIdentityIndex, identities_dir: Path, tmp_path: Path
) -> None:
    """End to end over gRPC: a TorchScript generator whose every frame hides a small
    enrolled face beside a large stranger's. Nothing may be released."""
    frame = torch.from_numpy(_composite(identities_dir)).permute(2, 0, 1).float() / 127.5 - 1.0
    generator_path = tmp_path / "fixed.pt"
    torch.jit.save(torch.jit.script(FixedFrame(frame)), str(generator_path))
    id01_index.save(tmp_path / "index")

    def settings(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "index_path": tmp_path / "index",
            "threshold": 0.40,
            "generator": "torchscript",
            "generator_path": generator_path,
            "max_attempts": 2,
            "models_dir": REPO / "models",
            "device": "cpu",
            "audit_log": "none",
            "seed_key_file": write_seed_key(tmp_path),
            **overrides,
        }
        return Settings(**values)  # type: ignore[arg-type]

    code, text = _serve_one(settings())
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # every candidate held back
    assert metric_value(text, "facegate_candidates_total", {"outcome": "rejected_identity"}) == 2
    assert metric_value(text, "facegate_candidates_total", {"outcome": "accepted"}) == 0
    # The control: the operator's explicit fast path (large faces only) would release it,
    # which is why it is never the default for a generator facegate has not verified.
    code, _ = _serve_one(settings(generated_fast_path="on"))
    assert code == grpc.StatusCode.OK
