"""The batched MTCNN (`mtcnn-batched`, the default detector) against facenet-pytorch's:
the same faces on the test photos, crops and NMS equal to facenet-pytorch's own (but for
version 3's rule: a box under a third of another's area does not suppress it), results
independent of the batch, and indexes tied to the detector that built them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from facenet_pytorch.models.utils import detect_face as facenet

from filter import mtcnn_batched, nms
from filter.errors import IndexMismatchError
from filter.faces import (
    DETECTOR_IDENTITIES,
    DetectedFace,
    DetectorSettings,
    MtcnnDetector,
    detector_choice,
)
from filter.images import decode_image
from filter.index import FaissIdentityIndex
from service.config import ConfigError, load_settings


@pytest.fixture(scope="module")
def batched() -> MtcnnDetector:
    return MtcnnDetector(DetectorSettings(implementation="mtcnn-batched"))


@pytest.fixture(scope="module")
def facenet_detector(batched: MtcnnDetector) -> MtcnnDetector:
    return batched.with_settings(replace(batched.settings, implementation="mtcnn"))


def _iou(a: DetectedFace, b: DetectedFace) -> float:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = w * h
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def _same_faces(a: list[DetectedFace], b: list[DetectedFace]) -> bool:
    return len(a) == len(b) and all(
        x.box == y.box and x.score == y.score and np.array_equal(x.landmarks, y.landmarks)
        for x, y in zip(a, b, strict=True)
    )


def test_the_default_detector_is_the_batched_one() -> None:
    assert DetectorSettings().implementation == "mtcnn-batched"
    assert DetectorSettings().as_dict()["detector"] == mtcnn_batched.NAME
    assert DetectorSettings().as_dict()["detector_version"] == mtcnn_batched.VERSION
    with pytest.raises(ValueError, match="unknown detector"):
        DetectorSettings(implementation="dlib")


@pytest.mark.slow
def test_same_faces_as_facenet_pytorch_on_the_test_photos(
    batched: MtcnnDetector, facenet_detector: MtcnnDetector, identities_dir: Path
) -> None:
    photos = sorted(identities_dir.glob("*/*.jpg"))
    assert len(photos) >= 20
    faces = 0
    for path in photos:
        image = decode_image(path)
        old = facenet_detector.detect([image])[0]
        new = batched.detect([image])[0]
        assert len(new) == len(old), path
        for face in old:
            best = max(new, key=lambda f: _iou(f, face))
            assert _iou(best, face) >= 0.99, path
            assert np.abs(best.landmarks - face.landmarks).max() < 0.05, path
            assert best.score == pytest.approx(face.score, abs=1e-4)
        faces += len(old)
    assert faces >= len(photos)


def test_detections_do_not_depend_on_the_batch(
    batched: MtcnnDetector, identities_dir: Path, models_dir: Path
) -> None:
    from service.generators import latents_for, load_dcgan_digiface

    generator = load_dcgan_digiface(models_dir)
    generated = list(generator.generate(np.stack([latents_for(9, s, 0, 100) for s in range(20)])))
    photo = decode_image(identities_dir / "id02" / "01.jpg")
    blank = np.full((64, 64, 3), 128, np.uint8)
    # Generated faces, a blank of the same size and a photo of another size, in one call.
    images = [*generated[:10], blank, photo, *generated[10:]]
    fast = batched.with_settings(replace(batched.settings, min_face_fraction=0.5))
    for detector in (batched, fast):
        together = detector.detect(images)
        assert sum(len(f) for f in together) >= 15
        for image, faces in zip(images, together, strict=True):
            assert _same_faces(detector.detect([image])[0], faces)
        # A different set of neighbours, in another order.
        assert _same_faces(detector.detect(images[::-3])[0], together[-1])


def test_rnet_and_onet_rows_get_the_same_bits_in_any_batch(batched: MtcnnDetector) -> None:
    rows = torch.randn(300, 3, 24, 24)
    with torch.inference_mode():
        everything = mtcnn_batched._run_rows(batched._rnet, rows)
        for start, stop in ((0, 1), (7, 12), (100, 133), (290, 300)):
            part = mtcnn_batched._run_rows(batched._rnet, rows[start:stop])
            for a, b in zip(everything, part, strict=True):
                assert torch.equal(a[start:stop], b)


@pytest.mark.parametrize(("scale", "table_dtype"), [(1, torch.float32), (5, torch.int32)])
def test_crops_equal_facenet_pytorchs_area_resampling(scale: int, table_dtype: torch.dtype) -> None:
    """For copies whose pixel sums fit float32 and for larger ones (an int32 table)."""
    generator = torch.Generator().manual_seed(0)
    height, width = 90 * scale, 120 * scale
    images = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8, generator=generator)
    # Boxes inside, across every edge, larger than the image and smaller than the crop.
    x1 = torch.randint(-40, 110, (200,), generator=generator).float() * scale + 0.5
    y1 = torch.randint(-40, 80, (200,), generator=generator).float() * scale + 0.25
    side = torch.randint(3, 150, (200,), generator=generator).float() * scale
    boxes = torch.stack([x1, y1, x1 + side, y1 + side * 0.9, torch.ones(200)], dim=1)
    image = torch.randint(0, 3, (200,), generator=generator)
    table = mtcnn_batched._summed_area_table(images)
    assert table.dtype == table_dtype
    crops, valid = mtcnn_batched._crops(table, boxes, image, 24, height, width)
    imgs = images.permute(0, 3, 1, 2).float()
    y, ey, x, ex = facenet.pad(boxes.clone(), width, height)
    checked = 0
    for k in range(len(boxes)):
        usable = ey[k] > y[k] - 1 and ex[k] > x[k] - 1
        assert bool(valid[k]) == usable
        if not usable:
            continue
        region = imgs[image[k] : image[k] + 1, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]]
        expected = (F.interpolate(region, size=(24, 24), mode="area") - 127.5) * 0.0078125
        assert torch.equal(crops[checked], expected[0])
        checked += 1
    assert checked == int(valid.sum()) and checked > 100


def test_grouped_nms_equals_torchvision_per_image() -> None:
    generator = torch.Generator().manual_seed(1)
    n = 400
    corner = torch.rand(n, 2, generator=generator) * 200 - 20
    size = torch.rand(n, 2, generator=generator) * 60 + 5
    # Quantised scores: many ties, as PNet's saturated probabilities give.
    scores = (torch.rand(n, generator=generator) * 8).floor() / 8
    boxes = torch.cat([corner, corner + size, scores[:, None]], dim=1)
    groups = torch.randint(0, 5, (n,), generator=generator)
    keep = nms.grouped_nms(boxes, groups, 0.5)
    for g in range(5):
        members = torch.nonzero(groups == g).flatten()
        alone = members[torchvision.ops.nms(boxes[members, :4], boxes[members, 4], 0.5)]
        assert torch.equal(keep[groups[keep] == g], alone)
    # Moving a group to another position in the batch changes nothing it keeps.
    moved = nms.grouped_nms(boxes, torch.where(groups == 0, 40, groups), 0.5)
    assert torch.equal(moved, keep)


def test_min_nms_equals_facenet_pytorchs_among_boxes_of_like_size() -> None:
    """Boxes 20-30 px a side: no box is under a third of another's area, where the two part."""
    generator = torch.Generator().manual_seed(2)
    n = 150
    corner = torch.rand(n, 2, generator=generator) * 100
    size = torch.rand(n, 2, generator=generator) * 10 + 20
    scores = torch.rand(n, generator=generator)
    boxes = torch.cat([corner, corner + size, scores[:, None]], dim=1)
    groups = torch.randint(0, 3, (n,), generator=generator)
    ours = nms.min_nms(boxes, groups, 0.7)
    theirs = facenet.batched_nms_numpy(boxes[:, :4], boxes[:, 4], groups, 0.7, "Min")
    assert 10 < len(ours) < n
    assert sorted(ours.tolist()) == sorted(theirs.tolist())


def test_a_small_box_inside_a_face_no_longer_removes_the_faces_box() -> None:
    """MTCNN's "Min" overlap of a box inside a larger one is 1: facenet-pytorch keeps the
    higher-scored small box (part of a face) and drops the face's box. A box of about the
    face's size still merges into it (the duplicates the last NMS is for)."""
    face = [0.0, 0.0, 60.0, 70.0, 0.90]
    inner = [20.0, 20.0, 35.0, 38.0, 0.95]  # 16 x 19 px: 7 % of the face's area
    duplicate = [2.0, 1.0, 58.0, 69.0, 0.85]
    third = [10.0, 10.0, 45.0, 50.0, 0.97]  # 36 x 41 px: 34 % of the face's area
    boxes = torch.tensor([face, inner, duplicate])
    groups = torch.zeros(3, dtype=torch.int64)
    theirs = facenet.batched_nms_numpy(boxes[:, :4], boxes[:, 4], groups, 0.7, "Min")
    assert sorted(theirs.tolist()) == [1]
    assert sorted(nms.min_nms(boxes, groups, 0.7).tolist()) == [0, 1]
    # At a third of the area or more a box inside still suppresses, as before.
    boxes = torch.tensor([face, third])
    groups = torch.zeros(2, dtype=torch.int64)
    assert nms.min_nms(boxes, groups, 0.7).tolist() == [1]


def test_a_generated_face_keeps_its_box_beside_a_box_inside_it(
    batched: MtcnnDetector, models_dir: Path
) -> None:
    """The case that showed it (README "The detector"): version 2 kept a 30 x 39 px box
    inside this 64 px face and dropped the face's own 68 x 77 px box."""
    from service.generators import latents_for, load_dcgan_digiface

    generator = load_dcgan_digiface(models_dir)
    image = generator.generate(latents_for(2, 60, 0, generator.latent_dim)[None])[0]
    faces = batched.detect([image])[0]
    assert any(face.width > 55 for face in faces), [face.box for face in faces]
    assert any(face.width < 40 for face in faces), [face.box for face in faces]


@pytest.mark.gpu
def test_min_nms_keeps_its_tensors_on_the_boxes_device() -> None:
    """On a CUDA device (the CPU under FACEGATE_GPU_TESTS_ON_CPU): the same boxes kept as
    on the CPU, small batches (one block) and large ones (blocked) alike."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    for n in (1, 150, nms.NMS_BLOCK + 50):
        corner = torch.rand(n, 2, generator=generator) * 100
        size = torch.rand(n, 2, generator=generator) * 40 + 5
        boxes = torch.cat([corner, corner + size, torch.rand(n, 1, generator=generator)], 1)
        groups = torch.randint(0, 3, (n,), generator=generator)
        on_cpu = nms.min_nms(boxes, groups, 0.7)
        on_device = nms.min_nms(boxes.to(device), groups.to(device), 0.7)
        assert on_device.device.type == device
        assert torch.equal(on_device.cpu(), on_cpu)


def test_an_index_built_with_another_detector_is_refused_with_how_to_rebuild(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    old = DetectorSettings(implementation="mtcnn").as_dict()
    index = FaissIdentityIndex.build(
        vectors,
        [f"id{i}" for i in range(6)],
        [f"{i}.jpg" for i in range(6)],
        embedder_name="test",
        model_sha256="0" * 64,
        detector=old,
    )
    folder = tmp_path / "idx"
    index.save(folder)
    with pytest.raises(IndexMismatchError) as refused:
        FaissIdentityIndex.load(folder, expect_detector=DetectorSettings().as_dict())
    message = str(refused.value)
    assert "mtcnn-facenet-pytorch-2.5.3" in message and mtcnn_batched.NAME in message
    assert "facegate index build" in message and "make run" in message
    assert "FACEGATE_DETECTOR=mtcnn" in message
    assert FaissIdentityIndex.load(folder, expect_detector=old).vector_count == 6
    assert detector_choice(old["detector"]) == "mtcnn"

    newer = {**DetectorSettings().as_dict(), "detector_version": "0"}
    index = FaissIdentityIndex.build(
        vectors,
        [f"id{i}" for i in range(6)],
        [f"{i}.jpg" for i in range(6)],
        embedder_name="test",
        model_sha256="0" * 64,
        detector=newer,
    )
    index.save(tmp_path / "v0")
    with pytest.raises(IndexMismatchError, match=r"version 0.*facegate index build"):
        FaissIdentityIndex.load(tmp_path / "v0", expect_detector=DetectorSettings().as_dict())


def test_the_detector_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEGATE_DETECTOR", raising=False)
    assert load_settings().detector == "mtcnn-batched"
    monkeypatch.setenv("FACEGATE_DETECTOR", "mtcnn")
    assert load_settings().detector == "mtcnn"
    monkeypatch.setenv("FACEGATE_DETECTOR", "opencv")
    with pytest.raises(ConfigError, match="FACEGATE_DETECTOR"):
        load_settings()


def test_bounded_nms_keeps_what_one_call_over_every_box_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above NMS_BLOCK boxes the Min NMS runs per group in blocks, above NMS_MAX_BOXES the
    IoU NMS in calls per group chunk: both keep exactly what the all-pairs versions keep,
    in the same order (quantised scores, so ties are many)."""
    generator = torch.Generator().manual_seed(4)
    n = 5000
    corner = torch.rand(n, 2, generator=generator) * 600
    size = torch.rand(n, 2, generator=generator) * 40 + 5
    scores = (torch.rand(n, generator=generator) * 16).floor() / 16
    boxes = torch.cat([corner, corner + size, scores[:, None]], dim=1)
    groups = torch.randint(0, 2, (n,), generator=generator)  # blocks within each group
    assert int((groups == 0).sum()) > 2 * nms.NMS_BLOCK
    blocked = nms.min_nms(boxes, groups, 0.7)
    chunked = nms.grouped_nms(boxes, groups, 0.5)
    monkeypatch.setattr(nms, "NMS_MAX_BOXES", 700)
    assert torch.equal(nms.grouped_nms(boxes, groups, 0.5), chunked)
    monkeypatch.setattr(nms, "NMS_BLOCK", 10**9)
    assert torch.equal(nms.min_nms(boxes, groups, 0.7), blocked)
    assert 100 < len(blocked) < n


def test_refining_crops_a_chunk_at_a_time_gives_the_same_bits(batched: MtcnnDetector) -> None:
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 200, 300, 3), dtype=torch.uint8, generator=generator)
    n = 1300  # three chunks of MAX_ROWS, the last padded
    x1 = torch.rand(n, generator=generator) * 320 - 10
    y1 = torch.rand(n, generator=generator) * 220 - 10
    side = torch.rand(n, generator=generator) * 60 + 2
    boxes = torch.stack([x1, y1, x1 + side, y1 + side, torch.ones(n)], dim=1)
    image = torch.randint(0, 2, (n,), generator=generator)
    table = mtcnn_batched._summed_area_table(images)
    with torch.inference_mode():
        crops, valid = mtcnn_batched._crops(table, boxes, image, 24, 200, 300)
        whole = mtcnn_batched._run_rows(batched._rnet, crops)
        kept, kept_image, parts = mtcnn_batched._refine(
            batched._rnet, table, boxes, image, 24, 200, 300
        )
    assert len(crops) > 2 * mtcnn_batched.MAX_ROWS
    assert torch.equal(kept, boxes[valid]) and torch.equal(kept_image, image[valid])
    for a, b in zip(whole, parts, strict=True):
        assert torch.equal(a, b)


def test_a_large_image_gets_the_same_faces_alone_and_in_any_batch(
    batched: MtcnnDetector, identities_dir: Path
) -> None:
    """Its windows are batched with other images' windows; what it gets does not move."""
    from bench.scenes import composite

    large = composite(1536, 40)
    photo = decode_image(identities_dir / "id02" / "01.jpg")
    other = composite(1536, None)
    alone = batched.detect([large])[0]
    assert len(alone) == 2
    assert _same_faces(batched.detect([photo, large, other])[1], alone)
    assert _same_faces(batched.detect([other, other, large])[2], alone)


def test_indexes_of_the_detector_before_native_resolution_passes_are_refused(
    tmp_path: Path,
) -> None:
    """Version 1 of the batched detector searched a 640 px copy only: its indexes miss the
    small faces of large gallery photos, so they are refused with the commands that
    rebuild and recalibrate; so are facenet-pytorch indexes made before the settings
    recorded the native-resolution passes (no version field: the new keys refuse them)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    current = DetectorSettings().as_dict()
    assert current["detector_version"] == "3"
    before = {k: v for k, v in current.items() if k not in ("tiling", "max_faces")}
    for name, recorded, running in (
        ("batched-v1", {**before, "detector_version": "1"}, current),
        ("batched-v2", {**current, "detector_version": "2"}, current),
        ("facenet", {**before, **DETECTOR_IDENTITIES["mtcnn"]}, _facenet_settings()),
    ):
        if name == "facenet":
            recorded.pop("detector_version")
        index = FaissIdentityIndex.build(
            vectors,
            [f"id{i}" for i in range(4)],
            [f"{i}.jpg" for i in range(4)],
            embedder_name="test",
            model_sha256="0" * 64,
            detector=recorded,
        )
        index.save(tmp_path / name)
        with pytest.raises(IndexMismatchError) as refused:
            FaissIdentityIndex.load(tmp_path / name, expect_detector=running)
        message = str(refused.value)
        assert "facegate index build" in message and "facegate calibrate" in message, message
        assert "FACEGATE_DETECTOR=" not in message  # no detector here loads it as it was
    assert "version 1" in _refusal(tmp_path / "batched-v1", current)
    assert "version 2" in _refusal(tmp_path / "batched-v2", current)
    assert "tiling" in _refusal(tmp_path / "facenet", _facenet_settings())


def _facenet_settings() -> dict[str, object]:
    return DetectorSettings(implementation="mtcnn").as_dict()


def _refusal(folder: Path, running: dict[str, object]) -> str:
    with pytest.raises(IndexMismatchError) as refused:
        FaissIdentityIndex.load(folder, expect_detector=running)
    return str(refused.value)


def test_pyramid_levels_from_the_table_equal_area_interpolation() -> None:
    """Every pyramid level is cut from the summed-area table: bit for bit what
    facenet-pytorch's `interpolate(mode="area")` gives, for shrinking and enlarging, odd
    sizes and the channels-last layout the batch arrives in."""
    generator = torch.Generator().manual_seed(3)
    for count, height, width, rows, cols in (
        (2, 160, 160, 25, 25),
        (1, 97, 131, 13, 18),
        (3, 64, 40, 45, 29),
        (1, 30, 50, 61, 77),  # enlarging (a minimum face below 12 px)
    ):
        images = torch.randint(
            0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator
        )
        table = mtcnn_batched._summed_area_table(images)
        level = mtcnn_batched._level(images, table, rows, cols)
        pooled = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(rows, cols), mode="area")
        assert torch.equal(level, (pooled - 127.5) * 0.0078125)


def test_a_row_gets_the_same_bits_whatever_shares_its_call(batched: MtcnnDetector) -> None:
    """On the CPU, RNet/ONet run in calls of NET_ROWS["cpu"] rows: a row gets the same bits
    wherever it sits in a call, whatever rows share it, and in any smaller call of
    ROW_QUANTUM multiples. Calls of 256 rows or more are not promised the same bits: on
    an AMX-capable Xeon (seen 2026-12-05) oneDNN takes another ONet kernel from there, one
    reason the CPU's calls stay small."""
    step = mtcnn_batched.NET_ROWS["cpu"]
    generator = torch.Generator().manual_seed(4)
    for net, size in ((batched._rnet, 24), (batched._onet, 48)):
        rows = torch.randn(300, 3, size, size, generator=generator)
        with torch.inference_mode():
            reference = mtcnn_batched._run_rows(net, rows, step)
            for smaller in range(mtcnn_batched.ROW_QUANTUM, step, mtcnn_batched.ROW_QUANTUM):
                split = mtcnn_batched._run_rows(net, rows, smaller)
                for a, b in zip(reference, split, strict=True):
                    assert torch.equal(a, b)
            moved = mtcnn_batched._run_rows(net, torch.roll(rows, 37, 0), step)
            for a, b in zip(reference, moved, strict=True):
                assert torch.equal(torch.roll(a, 37, 0), b)
            alone = mtcnn_batched._run_rows(net, rows[:20], step)
            for a, b in zip(reference, alone, strict=True):
                assert torch.equal(a[:20], b)
    with pytest.raises(ValueError, match="multiple"):
        mtcnn_batched._run_rows(batched._onet, rows, 40)
    assert mtcnn_batched.NET_ROWS["cpu"] < mtcnn_batched.MAX_ROWS
