"""The face adapter: detection with MTCNN and 5-point alignment.

Index building, calibration and serving all go through `FaceAligner`, so a
threshold means the same thing everywhere. An image is searched on an overview copy of
at most `max_side` pixels and, when it is larger, at native resolution in bounded windows
(`filter/tiling.py`); the faces of all passes are merged per image. Alignment is
`filter/alignment.py`. Two implementations of MTCNN share
facenet-pytorch's networks (`filter/mtcnn_backends.py`): `mtcnn-batched` (the default)
and `mtcnn` (facenet-pytorch's own `detect_face`); `DetectorSettings.implementation`
names one, and the detector picks its backend once, when it is made. Alignment from the
landmarks is ours for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from filter.alignment import align_face
from filter.fast_path_mode import GENERATED_FAST_PATH_FRACTION
from filter.mtcnn_backends import (
    BatchedMtcnn,
    FacenetMtcnn,
    MtcnnBackend,
    MtcnnNetworks,
    WindowFaces,
)
from filter.tiling import (
    Copies,
    Pass,
    Tiling,
    Unit,
    Window,
    batches,
    copy_size,
    fine_passes,
)


@dataclass(frozen=True)
class DetectedFace:
    """One face in original-image pixel coordinates."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


# Selectable implementations (FACEGATE_DETECTOR, --detector) and what the index manifest
# records for each: an index built by one is refused by the other.
MTCNN_BACKENDS: dict[str, type[BatchedMtcnn] | type[FacenetMtcnn]] = {
    "mtcnn-batched": BatchedMtcnn,
    "mtcnn": FacenetMtcnn,
}
DETECTOR_IDENTITIES: dict[str, dict[str, str]] = {
    choice: dict(backend.identity) for choice, backend in MTCNN_BACKENDS.items()
}
DEFAULT_DETECTOR = "mtcnn-batched"


def detector_choice(recorded_name: object) -> str | None:
    """The FACEGATE_DETECTOR value whose manifest name is `recorded_name`, if any."""
    for choice, identity in DETECTOR_IDENTITIES.items():
        if identity["detector"] == recorded_name:
            return choice
    return None


@dataclass(frozen=True)
class DetectorSettings:
    """Everything that changes what the detector finds; recorded in the index manifest."""

    max_side: int = 640  # the overview pass searches a copy whose long side is at most this
    min_side: int = 160  # small images (generated 64x64 crops) are upscaled to this
    min_face_size: int = 20  # in pixels of the copy searched
    # Generated face crops fill the frame, so small faces need not be searched for. A
    # minimum face size relative to the image drops the largest pyramid scales (most of
    # PNet's work). The size is rounded down to min_face_size / pyramid_factor^k, so
    # the remaining scales are exactly a subset of the full path's and every face the
    # fast path finds has the same box and landmarks as on the full path. 0 disables it.
    min_face_fraction: float = 0.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    pyramid_factor: float = 0.709
    implementation: str = DEFAULT_DETECTOR  # a key of DETECTOR_IDENTITIES
    # Images larger than max_side are also searched at native resolution, in windows, for
    # the faces the overview shrinks below min_face_size (`filter/tiling.py`). None: the
    # overview alone (the detector before version 2; for comparisons only).
    tiling: Tiling | None = field(default_factory=Tiling)
    # More faces than this in one image: none is searched and the image is rejected as
    # too_many_faces (index build skips it). The bound on the work one image may ask for.
    max_faces: int = 256

    def __post_init__(self) -> None:
        if self.implementation not in DETECTOR_IDENTITIES:
            raise ValueError(
                f"unknown detector {self.implementation!r}; "
                f"choose one of {', '.join(DETECTOR_IDENTITIES)}"
            )
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {self.max_faces}")

    def as_dict(self) -> dict[str, object]:
        return {
            **DETECTOR_IDENTITIES[self.implementation],
            "max_side": self.max_side,
            "min_side": self.min_side,
            "min_face_size": self.min_face_size,
            "min_face_fraction": self.min_face_fraction,
            "thresholds": list(self.thresholds),
            "pyramid_factor": self.pyramid_factor,
            "tiling": None if self.tiling is None else self.tiling.as_dict(),
            "max_faces": self.max_faces,
        }


# Detection for face-centred generator output (DCGAN/StyleGAN crops): only faces of at
# least half the short side. Enabled only for generator output; `make bench` measures
# its agreement with the full path (1.0 on 1000 DCGAN faces). Applied with
# `dataclasses.replace(settings, min_face_fraction=...)` so the implementation is kept.
GENERATED_FAST_PATH = DetectorSettings(min_face_fraction=GENERATED_FAST_PATH_FRACTION)


def effective_min_face(settings: DetectorSettings, short_side: int) -> float:
    """The minimum face size for a detection copy: the configured size, or, with a
    fraction set, the largest min_face_size / factor^k not above fraction * short_side."""
    size = float(settings.min_face_size)
    if settings.min_face_fraction <= 0:
        return size
    limit = settings.min_face_fraction * short_side
    while size / settings.pyramid_factor <= limit:
        size /= settings.pyramid_factor
    return size


class Detector(Protocol):
    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces found in each HxWx3 uint8 RGB image, in input order. An image may be a
        view with any strides (a turned image is one). An image the detector cannot search
        (see `searchable`) gets an empty list, never an exception."""
        ...

    def searchable(self, height: int, width: int) -> bool:
        """Whether an image of this size can be searched for faces at all."""
        ...


def detection_copy_size(height: int, width: int, settings: DetectorSettings) -> tuple[int, int]:
    """(height, width) of the overview pass's copy."""
    return copy_size(height, width, detection_scale(height, width, settings))


def detection_passes(height: int, width: int, settings: DetectorSettings) -> list[Pass]:
    """Every search of an image of this size: the overview (today's copy, the whole
    pyramid) when its copy is searchable, then the native-resolution passes for the small
    faces it cannot see (not on the generated fast path, which looks for large faces
    only). MTCNN's pyramid needs a copy's short side to hold one minimum-size face."""
    scale = detection_scale(height, width, settings)
    copy_height, copy_width = copy_size(height, width, scale)
    passes: list[Pass] = []
    min_face = float(settings.min_face_size)
    if min(copy_height, copy_width) >= min_face:
        whole = Window(0, 0, copy_height, copy_width)
        passes.append(Pass(scale, copy_height, copy_width, min_face, None, (whole,)))
    if settings.tiling is not None and settings.min_face_fraction <= 0:
        passes += fine_passes(height, width, scale, min_face, settings.tiling)
    return passes


def searchable_geometry(height: int, width: int, settings: DetectorSettings) -> bool:
    """Whether any pass can search an image of this size. One that none can (a 1000x10
    strip, say) cannot be searched for faces: the filter rejects it for its geometry."""
    return bool(detection_passes(height, width, settings))


def detection_scale(height: int, width: int, settings: DetectorSettings) -> float:
    """Factor that maps an image onto its overview copy."""
    long_side, short_side = max(height, width), min(height, width)
    if long_side > settings.max_side:
        return settings.max_side / long_side
    if short_side < settings.min_side:
        return min(settings.min_side / short_side, settings.max_side / long_side)
    return 1.0


class MtcnnDetector:
    """MTCNN with facenet-pytorch's networks, batched over images of equal size; the
    backend (batched or facenet-pytorch's) is the one `settings.implementation` names."""

    def __init__(
        self,
        settings: DetectorSettings | None = None,
        device: torch.device | str = "cpu",
        *,
        networks: MtcnnNetworks | None = None,
    ) -> None:
        """`networks`: share loaded networks (and their lock) instead of loading a set on
        `device`; the detector then runs on the networks' device."""
        self.settings = settings or DetectorSettings()
        self._networks = networks if networks is not None else MtcnnNetworks(device)
        self.device = self._networks.device
        backend = MTCNN_BACKENDS[self.settings.implementation]
        self._backend: MtcnnBackend = backend(
            self._networks, self.settings.thresholds, self.settings.pyramid_factor
        )

    def with_settings(self, settings: DetectorSettings) -> MtcnnDetector:
        """A detector with other settings sharing these networks (no second load)."""
        return MtcnnDetector(settings, networks=self._networks)

    @property
    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """PNet, RNet and ONet (the benchmarks time them apart from the bookkeeping)."""
        return self._networks.pnet, self._networks.rnet, self._networks.onet

    # The batched implementation's tests run its stages on these networks directly.
    @property
    def _rnet(self) -> torch.nn.Module:
        return self._networks.rnet

    @property
    def _onet(self) -> torch.nn.Module:
        return self._networks.onet

    def searchable(self, height: int, width: int) -> bool:
        return searchable_geometry(height, width, self.settings)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        """Every pass's windows of every image, batched by window shape and face range in
        calls of at most DETECT_BATCH_PIXELS (one window alone may be more), then merged
        per image. An image searched by one window only (any image of max_side or less)
        gets that window's faces, exactly as before the finer passes existed."""
        units: list[Unit] = []
        for i, image in enumerate(images):
            _check_rgb(image)
            height, width = image.shape[:2]
            for p, search in enumerate(detection_passes(height, width, self.settings)):
                units += [Unit(i, p, search, window) for window in search.windows]
        groups: dict[tuple[int, int, float, float | None], list[Unit]] = {}
        for unit in units:
            window = unit.window
            key = (window.height, window.width, unit.search.min_face, unit.search.max_face)
            groups.setdefault(key, []).append(unit)
        copies = Copies(images, units)
        found: list[list[tuple[Unit, np.ndarray, np.ndarray]]] = [[] for _ in images]
        budget = DETECT_BATCH_PIXELS.get(self.device.type, DETECT_BATCH_PIXELS["cpu"])
        for (height, width, _, max_face), members in groups.items():
            for part in batches(members, height * width, budget):
                batch = np.stack([copies.window(unit) for unit in part])
                if max_face is None:  # the overview: the whole pyramid (and the fast path's)
                    min_face = effective_min_face(self.settings, min(height, width))
                else:
                    min_face = part[0].search.min_face
                per_unit = self._detect_batch(batch, min_face, max_face)
                del batch
                for unit, (boxes, points) in zip(part, per_unit, strict=True):
                    found[unit.image].append((unit, boxes, points))
                    copies.done(unit)
        return [_merge(parts) for parts in found]

    def _detect_batch(
        self, batch: np.ndarray, min_face_size: float, max_face_size: float | None
    ) -> list[WindowFaces]:
        """(boxes with scores (K, 5), landmarks (K, 5, 2)) of each image of an equal-size
        batch, float32, in the copy's pixels."""
        with self._networks.lock, torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device)
            return self._backend.detect_batch(tensor, min_face_size, max_face_size)


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")


# Pixels of the windows in one detection call: the bound on its working memory (about
# 60 bytes a pixel: the float copy, PNet's activations, the summed-area table), not on
# its results, which do not depend on the batch. On the CPU 8 overview copies of
# 512x512, 64 generated faces (160x160) or two full windows make one call (4 MP cost a
# 64 MP image about 0.1 GiB more at its peak, for no speed: python -m bench.run filter
# and the slow memory test); a GPU keeps the batches that fill it (512 generated faces)
# whole.
DETECT_BATCH_PIXELS = {"cpu": 2 * 1024 * 1024, "cuda": 32 * 1024 * 1024}
# Faces found by two passes or two windows are one face when their boxes overlap by this
# much (IoU). Not facenet-pytorch's "Min" overlap: that would let a small detection
# inside a large face (an eye at native resolution) remove the large face itself. Boxes
# of the same window are never merged: MTCNN's own suppression already told them apart,
# and two faces that overlap (one partly behind the other) must both be searched.
MERGE_IOU = 0.5


def _merge(parts: list[tuple[Unit, np.ndarray, np.ndarray]]) -> list[DetectedFace]:
    """One image's faces, in its own pixels, best first. One window: its faces as they
    come (the exact arithmetic of the detector before the finer passes). Several: each
    window's faces it vouches for (see `Window.keeps`), moved to the image's pixels, and
    one face kept of each face found by several windows (`_merge_across_windows`)."""
    if not parts:
        return []
    if len(parts) == 1:
        unit, boxes, points = parts[0]
        faces = sorted(_faces(boxes, points), key=lambda f: -f.score)
        return [_rescale(face, unit.search.scale) for face in faces]
    all_boxes, all_points, all_units = [], [], []
    for number, (unit, boxes, points) in enumerate(parts):
        w = unit.window
        moved = boxes.astype(np.float64)
        moved[:, [0, 2]] += w.left
        moved[:, [1, 3]] += w.top
        kept = w.keeps(moved)
        marks = points[kept].astype(np.float64) + np.array([w.left, w.top])
        moved = moved[kept]
        moved[:, :4] /= unit.search.scale
        all_boxes.append(moved)
        all_points.append(marks / unit.search.scale)
        all_units.append(np.full(len(moved), number))
    boxes64 = np.concatenate(all_boxes)
    points64 = np.concatenate(all_points)
    if len(boxes64) == 0:
        return []
    keep = _merge_across_windows(boxes64, np.concatenate(all_units))
    return _faces(boxes64[keep], points64[keep].astype(np.float32))


def _merge_across_windows(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Indices of the boxes kept, best first: greedily by score, a box is dropped when it
    overlaps a kept box of another window by more than MERGE_IOU (the same face found
    twice); boxes of one window never drop each other."""
    order = np.argsort(-boxes[:, 4], kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    for i in order:
        if kept:
            others = np.array(kept)
            others = others[windows[others] != windows[i]]
            if len(others):
                w = np.minimum(boxes[others, 2], boxes[i, 2]) - np.maximum(
                    boxes[others, 0], boxes[i, 0]
                )
                h = np.minimum(boxes[others, 3], boxes[i, 3]) - np.maximum(
                    boxes[others, 1], boxes[i, 1]
                )
                inter = np.clip(w, 0, None) * np.clip(h, 0, None)
                iou = inter / (areas[others] + areas[i] - inter)
                if np.any(iou > MERGE_IOU):
                    continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)


def _faces(boxes: np.ndarray, points: np.ndarray) -> list[DetectedFace]:
    return [
        DetectedFace(
            box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
            score=float(b[4]),
            landmarks=np.array(p, dtype=np.float32),
        )
        for b, p in zip(boxes, points, strict=True)
    ]


def _rescale(face: DetectedFace, scale: float) -> DetectedFace:
    if scale == 1.0:
        return face
    inv = 1.0 / scale
    x1, y1, x2, y2 = face.box
    return DetectedFace(
        box=(x1 * inv, y1 * inv, x2 * inv, y2 * inv),
        score=face.score,
        landmarks=(face.landmarks * inv).astype(np.float32),
    )


class FaceAligner:
    """Detect every face in each image and return aligned crops for an embedder."""

    def __init__(self, detector: Detector, crop_size: int) -> None:
        self.detector = detector
        self.crop_size = crop_size

    def faces(
        self, images: Sequence[np.ndarray]
    ) -> tuple[list[list[DetectedFace]], list[np.ndarray]]:
        """Per-image faces and per-image stacks of aligned crops (N x S x S x 3 uint8)."""
        detected = self.detector.detect(images)
        crops: list[np.ndarray] = []
        for image, faces in zip(images, detected, strict=True):
            if faces:
                crops.append(
                    np.stack([align_face(image, f.landmarks, self.crop_size) for f in faces])
                )
            else:
                crops.append(np.zeros((0, self.crop_size, self.crop_size, 3), dtype=np.uint8))
        return detected, crops
