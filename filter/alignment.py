"""Alignment: a face's five landmarks onto the ArcFace template, by a similarity transform
(rotation, uniform scale, shift; Umeyama's least squares), so that every embedder sees
faces where it was trained to see them."""

from __future__ import annotations

import math

import cv2
import numpy as np

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
