"""The face adapter: detection with MTCNN and 5-point alignment.

Index building, calibration and serving all go through `FaceAligner`, so a
threshold means the same thing everywhere. Two implementations of MTCNN share
facenet-pytorch's networks: `mtcnn-batched` (the default, `filter/mtcnn_batched.py`:
every stage one tensor program over the batch, results independent of the batch) and
`mtcnn` (facenet-pytorch's own `detect_face`). For the latter this module hides
facenet-pytorch's quirks: it always feeds MTCNN the same input type (a uint8 RGB tensor,
never PIL, whose crops differ), calls the batch detector directly so "no face" is an
empty array rather than `None`. Alignment from the landmarks is ours for both.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch

from filter import mtcnn_batched

# The ArcFace 112x112 template (left eye, right eye, nose, left and right mouth
# corner): the standard target for SFace and most modern embedders.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
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
# records for each: an index built by one is refused by the other. The facenet-pytorch
# entry keeps the name that indexes built before the batched detector record.
DETECTOR_IDENTITIES: dict[str, dict[str, str]] = {
    "mtcnn-batched": {"detector": mtcnn_batched.NAME, "detector_version": mtcnn_batched.VERSION},
    "mtcnn": {"detector": "mtcnn-facenet-pytorch-2.5.3"},
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

    max_side: int = 640  # detect on a copy whose long side is at most this
    min_side: int = 160  # small images (generated 64x64 crops) are upscaled to this
    min_face_size: int = 20  # in pixels of the detection copy
    # Generated face crops fill the frame, so small faces need not be searched for. A
    # minimum face size relative to the image drops the largest pyramid scales (most of
    # PNet's work). The size is rounded down to min_face_size / pyramid_factor^k, so
    # the remaining scales are exactly a subset of the full path's and every face the
    # fast path finds has the same box and landmarks as on the full path. 0 disables it.
    min_face_fraction: float = 0.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    pyramid_factor: float = 0.709
    implementation: str = DEFAULT_DETECTOR  # a key of DETECTOR_IDENTITIES

    def __post_init__(self) -> None:
        if self.implementation not in DETECTOR_IDENTITIES:
            raise ValueError(
                f"unknown detector {self.implementation!r}; "
                f"choose one of {', '.join(DETECTOR_IDENTITIES)}"
            )

    def as_dict(self) -> dict[str, object]:
        return {
            **DETECTOR_IDENTITIES[self.implementation],
            "max_side": self.max_side,
            "min_side": self.min_side,
            "min_face_size": self.min_face_size,
            "min_face_fraction": self.min_face_fraction,
            "thresholds": list(self.thresholds),
            "pyramid_factor": self.pyramid_factor,
        }


# Detection for face-centred generator output (DCGAN/StyleGAN crops): only faces of at
# least half the short side. Enabled only for generator output; `make bench` measures
# its agreement with the full path (1.0 on 1000 DCGAN faces). Applied with
# `dataclasses.replace(settings, min_face_fraction=...)` so the implementation is kept.
GENERATED_FAST_PATH = DetectorSettings(min_face_fraction=0.5)


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
        """Faces found in each HxWx3 uint8 RGB image, in input order. An image the detector
        cannot search (see `searchable`) gets an empty list, never an exception."""
        ...

    def searchable(self, height: int, width: int) -> bool:
        """Whether an image of this size can be searched for faces at all."""
        ...


def detection_copy_size(height: int, width: int, settings: DetectorSettings) -> tuple[int, int]:
    """(height, width) of the copy the detector searches."""
    scale = detection_scale(height, width, settings)
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def searchable_geometry(height: int, width: int, settings: DetectorSettings) -> bool:
    """MTCNN's pyramid needs the detection copy's short side to hold one minimum-size face;
    below that facenet-pytorch builds an empty pyramid and fails. Such an image (a
    1000x10 strip, say) cannot be searched: the filter rejects it for its geometry."""
    copy_height, copy_width = detection_copy_size(height, width, settings)
    return min(copy_height, copy_width) >= settings.min_face_size


def detection_scale(height: int, width: int, settings: DetectorSettings) -> float:
    """Factor that maps an image onto its detection copy."""
    long_side, short_side = max(height, width), min(height, width)
    if long_side > settings.max_side:
        return settings.max_side / long_side
    if short_side < settings.min_side:
        return min(settings.min_side / short_side, settings.max_side / long_side)
    return 1.0


class MtcnnDetector:
    """MTCNN with facenet-pytorch's networks, batched over images of equal size; the
    implementation (`settings.implementation`) is the batched one or facenet-pytorch's."""

    def __init__(
        self,
        settings: DetectorSettings | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.settings = settings or DetectorSettings()
        self.device = torch.device(device)
        # channels_last lets oneDNN (CPU) and cuDNN use their fast convolution and pooling
        # kernels: about 2.5x faster RNet/ONet on 2 cores, outputs equal within 1e-4.
        self._pnet, self._rnet, self._onet = (
            net().to(self.device).eval().to(memory_format=torch.channels_last)
            for net in (PNet, RNet, ONet)
        )
        # One detection at a time per network set: concurrent callers (CLI threads, tests)
        # would otherwise oversubscribe the cores torch already parallelises over.
        self._lock = threading.Lock()

    def with_settings(self, settings: DetectorSettings) -> MtcnnDetector:
        """A detector with other settings sharing these networks (no second load)."""
        twin = object.__new__(MtcnnDetector)
        twin.settings = settings
        twin.device = self.device
        twin._pnet, twin._rnet, twin._onet = self._pnet, self._rnet, self._onet
        twin._lock = self._lock
        return twin

    def searchable(self, height: int, width: int) -> bool:
        return searchable_geometry(height, width, self.settings)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        results: list[list[DetectedFace]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[int]] = {}
        prepared: dict[int, np.ndarray] = {}
        scales: dict[int, float] = {}
        for i, image in enumerate(images):
            _check_rgb(image)
            if not self.searchable(image.shape[0], image.shape[1]):
                continue
            scale = detection_scale(image.shape[0], image.shape[1], self.settings)
            copy = _resize(image, scale)
            prepared[i] = copy
            scales[i] = scale
            groups.setdefault((copy.shape[0], copy.shape[1]), []).append(i)
        for indices in groups.values():
            batch = np.stack([prepared[i] for i in indices])
            min_face = effective_min_face(self.settings, min(batch.shape[1], batch.shape[2]))
            per_image = self._detect_batch(batch, min_face)
            for i, faces in zip(indices, per_image, strict=True):
                results[i] = [_rescale(face, scales[i]) for face in faces]
        return results

    def _detect_batch(self, batch: np.ndarray, min_face_size: float) -> list[list[DetectedFace]]:
        with self._lock, torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device)
            if self.settings.implementation == "mtcnn":
                per_image = self._facenet_detect(tensor, min_face_size)
            else:
                per_image = self._batched_detect(tensor, min_face_size)
        out: list[list[DetectedFace]] = []
        for boxes, points in per_image:
            faces = [
                DetectedFace(
                    box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                    score=float(b[4]),
                    landmarks=p.copy(),
                )
                for b, p in zip(boxes, points, strict=True)
            ]
            faces.sort(key=lambda f: -f.score)
            out.append(faces)
        return out

    def _batched_detect(
        self, batch: torch.Tensor, min_face_size: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        found = mtcnn_batched.detect_batch(
            batch,
            min_face_size,
            (self._pnet, self._rnet, self._onet),
            self.settings.thresholds,
            self.settings.pyramid_factor,
        )
        image = found.image.cpu().numpy()
        order = np.argsort(image, kind="stable")  # keeps each image's own order
        bounds = np.cumsum(np.bincount(image, minlength=len(batch)))[:-1]
        boxes = np.split(found.boxes.cpu().numpy().astype(np.float32)[order], bounds)
        points = np.split(found.points.cpu().numpy().astype(np.float32)[order], bounds)
        return list(zip(boxes, points, strict=True))

    def _facenet_detect(
        self, batch: torch.Tensor, min_face_size: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        from facenet_pytorch.models.utils.detect_face import detect_face

        batch_boxes, batch_points = detect_face(
            batch,
            min_face_size,
            self._pnet,
            self._rnet,
            self._onet,
            list(self.settings.thresholds),
            self.settings.pyramid_factor,
            self.device,
        )
        # facenet-pytorch returns object arrays whose shape depends on whether every
        # image found the same number of faces; normalise to plain float arrays.
        return [
            (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 5),
                np.asarray(points, dtype=np.float32).reshape(-1, 5, 2),
            )
            for boxes, points in zip(batch_boxes, batch_points, strict=True)
        ]


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return np.ascontiguousarray(image)
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


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


def template_for(size: int) -> np.ndarray:
    """The ArcFace template scaled to a square crop of `size` pixels."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp a face onto the template with a similarity transform (rotation, scale, shift)."""
    template = template_for(size)
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64), template)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) mapping src points onto dst; 2x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    reflection = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        reflection[1, 1] = -1.0
    rotation = u @ reflection @ vt
    src_var = (src_c**2).sum() / len(src)
    scale = float((singular * np.diag(reflection)).sum() / src_var) if src_var > 0 else 1.0
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]]).astype(np.float32)


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
