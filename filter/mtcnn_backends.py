"""The two implementations of MTCNN behind `filter.faces.MtcnnDetector`, over one set of
facenet-pytorch's networks: `BatchedMtcnn` (`filter/mtcnn_batched.py`: every stage one
tensor program over the batch, results independent of the batch) and `FacenetMtcnn`
(facenet-pytorch's own `detect_face`). Each searches one batch of equal-size windows and
gives its faces in the window's pixels; passes, windows and merging are the detector's.

For facenet-pytorch this module hides its quirks: it is always fed the same input type
(a uint8 RGB tensor, never PIL, whose crops differ) and its batch detector is called
directly, so "no face" is an empty array rather than `None`.
"""

from __future__ import annotations

import threading
from typing import ClassVar, Protocol

import numpy as np
import torch

from filter import mtcnn_batched

# (boxes with scores (K, 5), landmarks (K, 5, 2)) of one window, float32.
WindowFaces = tuple[np.ndarray, np.ndarray]


class MtcnnNetworks:
    """PNet, RNet and ONet, loaded once and shared by every detector made from them
    (`MtcnnDetector.with_settings`), with the lock that serialises their use."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.device = torch.device(device)
        # channels_last lets oneDNN (CPU) and cuDNN use their fast convolution and pooling
        # kernels: about 2.5x faster RNet/ONet on 2 cores, outputs equal within 1e-4.
        self.pnet, self.rnet, self.onet = (
            net().to(self.device).eval().to(memory_format=torch.channels_last)
            for net in (PNet, RNet, ONet)
        )
        # One detection at a time per network set: concurrent callers (CLI threads, tests)
        # would otherwise oversubscribe the cores torch already parallelises over.
        self.lock = threading.Lock()


class MtcnnBackend(Protocol):
    # What the index manifest records for this implementation: an index built by one is
    # refused by the other.
    identity: ClassVar[dict[str, str]]

    def detect_batch(
        self, batch: torch.Tensor, min_face_size: float, max_face_size: float | None
    ) -> list[WindowFaces]:
        """The faces of each window of an equal-size uint8 RGB batch (on the networks'
        device), in the window's pixels. Called under the networks' lock."""
        ...


class _OverNetworks:
    """What both implementations run with: the shared networks, the three stages'
    thresholds and the pyramid factor."""

    def __init__(
        self, networks: MtcnnNetworks, thresholds: tuple[float, float, float], factor: float
    ) -> None:
        self.networks = networks
        self.thresholds = thresholds
        self.factor = factor


class BatchedMtcnn(_OverNetworks):
    identity: ClassVar[dict[str, str]] = {
        "detector": mtcnn_batched.NAME,
        "detector_version": mtcnn_batched.VERSION,
    }

    def detect_batch(
        self, batch: torch.Tensor, min_face_size: float, max_face_size: float | None
    ) -> list[WindowFaces]:
        nets = self.networks
        found = mtcnn_batched.detect_batch(
            batch,
            min_face_size,
            (nets.pnet, nets.rnet, nets.onet),
            self.thresholds,
            self.factor,
            max_face_size,
        )
        # One transfer for the whole batch (on a GPU, one host synchronisation): boxes,
        # landmarks and image indices side by side (an index is exact in float32 far
        # beyond any batch).
        packed = torch.cat(
            [found.boxes, found.points.reshape(-1, 10), found.image[:, None].float()], dim=1
        )
        rows = packed.cpu().numpy().astype(np.float32)
        image = rows[:, 15].astype(np.int64)
        order = np.argsort(image, kind="stable")  # keeps each image's own order
        bounds = np.cumsum(np.bincount(image, minlength=len(batch)))[:-1]
        boxes = np.split(rows[order, :5], bounds)
        points = np.split(rows[order, 5:15].reshape(-1, 5, 2), bounds)
        return list(zip(boxes, points, strict=True))


class FacenetMtcnn(_OverNetworks):
    # The name that indexes built before the batched detector record.
    identity: ClassVar[dict[str, str]] = {"detector": "mtcnn-facenet-pytorch-2.5.3"}

    def detect_batch(
        self, batch: torch.Tensor, min_face_size: float, max_face_size: float | None
    ) -> list[WindowFaces]:
        """Searches the whole pyramid whatever `max_face_size` (the detector's merge drops
        what it finds twice)."""
        from facenet_pytorch.models.utils.detect_face import detect_face

        nets = self.networks
        batch_boxes, batch_points = detect_face(
            batch,
            min_face_size,
            nets.pnet,
            nets.rnet,
            nets.onet,
            list(self.thresholds),
            self.factor,
            nets.device,
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
