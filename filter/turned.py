"""Faces turned on their side or upside down, for `facegate check` and `facegate batch`.

MTCNN finds faces within about 45 degrees of upright: a face stored a quarter or a half
turn away (a photo stored turned, or a face hidden that way beside a stranger) is found
only in a turned copy. `TurnedDetector` also searches each image turned by each quarter
turn, maps what it finds there back to the image's own pixels, and adds each confident
face (`TURNED_MIN_SCORE`) that no face already found covers (IoU over
`filter.faces.MERGE_IOU`): the faces found upright are kept as they are, so an upright
face is searched once, not once per turn (a match would otherwise be the best of four
noisy looks at one face, and thresholds calibrated on one look would reject more; on
the 33 test photos the faces, scores and verdicts are those of the upright search).
Alignment then turns each face upright from its landmarks, as it does any tilted face.

The generation service does not use it: generated faces are upright, and its thresholds
and throughput are measured on the upright search. Enrolment does not either: a gallery
face is enrolled as found upright.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from filter.faces import MERGE_IOU, DetectedFace, Detector, FaceAligner
from filter.identity_filter import FaceEmbeddingPipeline

# Quarter turns (counter-clockwise, as np.rot90 turns) each image is also searched at.
TURNS = (1, 2, 3)
# The ONet confidence a face found only turned must have. Turned copies of upright photos
# give false detections (an ear, a shadow, part of the upright face) at 0.84-0.92 on the
# test photos, each of which would be searched, and would count as a face for the no-face
# rule; the faces themselves, found upright (which is what a turned face is to its turned
# copy), score 0.997 or more there.
TURNED_MIN_SCORE = 0.99


class TurnedDetector:
    """A detector that also searches each image at each of `turns` quarter turns."""

    def __init__(self, inner: Detector, turns: Sequence[int] = TURNS) -> None:
        self.inner = inner
        self.turns = tuple(turns)
        # What an index records and requires of the detector, and its device, are the
        # inner detector's: the turned search is a scope of checking, not of embedding.
        self.settings = getattr(inner, "settings", None)
        self.device = getattr(inner, "device", "cpu")

    def searchable(self, height: int, width: int) -> bool:
        return self.inner.searchable(height, width)

    def detect(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        found = [list(faces) for faces in self.inner.detect(images)]
        for turn in self.turns:
            # Views, not copies: the detector copies only the windows it searches (and a
            # pass's smaller copy), so a 64 MP image is not held twice while it is searched.
            turned = [np.rot90(image, turn) for image in images]
            for faces, image, extra in zip(found, images, self.inner.detect(turned), strict=True):
                height, width = image.shape[:2]
                for face in sorted(extra, key=lambda f: -f.score):
                    if face.score < TURNED_MIN_SCORE:
                        break
                    back = turned_back(face, turn, height, width)
                    if not any(_iou(back.box, kept.box) > MERGE_IOU for kept in faces):
                        faces.append(back)
        return found


def turned_back(face: DetectedFace, turn: int, height: int, width: int) -> DetectedFace:
    """A face found in `np.rot90(image, turn)` in the pixels of `image` (height x width),
    in pixel-index coordinates (x a column, y a row)."""
    points = np.vstack([face.landmarks.astype(np.float64), _corners(face.box)])
    x, y = points[:, 0], points[:, 1]
    if turn % 4 == 1:  # turned[i, j] = image[j, W-1-i]
        x, y = width - 1 - y, x
    elif turn % 4 == 2:  # turned[i, j] = image[H-1-i, W-1-j]
        x, y = width - 1 - x, height - 1 - y
    elif turn % 4 == 3:  # turned[i, j] = image[H-1-j, i]
        x, y = y, height - 1 - x
    marks = np.stack([x[:5], y[:5]], axis=1).astype(np.float32)
    box = (float(x[5:].min()), float(y[5:].min()), float(x[5:].max()), float(y[5:].max()))
    return DetectedFace(box=box, score=face.score, landmarks=marks)


def searching_turned(pipeline: FaceEmbeddingPipeline) -> FaceEmbeddingPipeline:
    """The same pipeline (networks, embedder, device), its detector also searching turned."""
    return pipeline.with_aligners(
        lambda aligner: FaceAligner(TurnedDetector(aligner.detector), aligner.crop_size)
    )


def _corners(box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y2]], dtype=np.float64)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
