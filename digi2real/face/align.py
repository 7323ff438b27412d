"""Alignment to the ArcFace 5-point template (insightface's ``face_align``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from insightface.utils import face_align

from digi2real.face.detect import Detection, FaceDetector, check_image
from digi2real.face.landmarks import compose, crop_matrix, identity_matrix, resize_matrix

logger = logging.getLogger(__name__)

ARCFACE_TEMPLATE: np.ndarray = face_align.arcface_dst  # 5x2 points for a 112x112 crop

AlignMethod = Literal["aligned_input", "detected", "center_crop"]


def _check_size(size: int) -> None:
    # estimate_norm scales the template for multiples of 112 (or 128, with an x offset).
    if not isinstance(size, int) or size <= 0 or (size % 112 and size % 128):
        raise ValueError(f"aligned size must be a positive multiple of 112 or 128, got {size!r}")


def align_face(image_rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image_rgb`` so the 5 keypoints ``kps`` land on the ArcFace template."""
    check_image(image_rgb, "image_rgb")
    _check_size(size)
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise ValueError(f"kps must be a finite (5, 2) array, got shape {kps.shape}")
    return face_align.norm_crop(image_rgb, kps, image_size=size)


def is_aligned_crop(image: np.ndarray, size: int = 112) -> bool:
    """True for an image of exactly ``size`` x ``size`` (e.g. a DigiFace render).

    Such inputs are taken as already aligned and skip detection.
    """
    return image.ndim >= 2 and image.shape[0] == size and image.shape[1] == size


def center_crop_matrix(shape: tuple[int, ...], size: int) -> np.ndarray:
    """The 2x3 map of :func:`center_crop_align` from an image of ``shape``."""
    height, width = shape[:2]
    side = min(height, width)
    window = crop_matrix((width - side) // 2, (height - side) // 2)
    return window if side == size else compose(window, resize_matrix((side, side), (size, size)))


def center_crop_align(image_rgb: np.ndarray, size: int = 112) -> np.ndarray:
    """Square centre crop resized to ``size``: the tiny profile's explicit fallback."""
    check_image(image_rgb, "image_rgb")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    height, width = image_rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image_rgb[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


@dataclass(frozen=True, eq=False)
class AlignResult:
    """An aligned crop (or None when no face was usable), how it was obtained, and the 2x3
    map from the input's pixels to the crop's."""

    image: np.ndarray | None
    method: AlignMethod | None
    detection: Detection | None = None
    matrix: np.ndarray | None = None


def locate_and_align(
    image_rgb: np.ndarray,
    detector: FaceDetector | None,
    size: int = 112,
) -> AlignResult:
    """Aligned ``size`` crop of the best face in ``image_rgb``.

    Already-aligned crops are returned as they are; otherwise the highest-scoring face is
    aligned. With no face, the detector spec's ``fallback`` decides: ``"center_crop"``
    crops, ``"none"`` returns ``AlignResult(None, None)`` so the caller can record why.
    """
    check_image(image_rgb, "image_rgb")
    if is_aligned_crop(image_rgb, size):
        return AlignResult(
            np.ascontiguousarray(image_rgb), "aligned_input", None, identity_matrix()
        )
    if detector is None:
        raise ValueError(
            f"image of shape {image_rgb.shape} is not a {size}x{size} aligned crop "
            "and no detector was given"
        )
    detections = detector.detect(image_rgb)
    if detections:
        best = detections[0]
        matrix = face_align.estimate_norm(np.asarray(best.kps, np.float32), size)
        return AlignResult(align_face(image_rgb, best.kps, size), "detected", best, matrix)
    if detector.spec.fallback == "center_crop":
        return AlignResult(
            center_crop_align(image_rgb, size),
            "center_crop",
            None,
            center_crop_matrix(image_rgb.shape, size),
        )
    return AlignResult(None, None)


def resize_square(image_rgb: np.ndarray, size: int) -> np.ndarray:
    """A square image resized to ``size`` (bicubic up, area down: deterministic cv2)."""
    if image_rgb.shape[0] == size:
        return np.ascontiguousarray(image_rgb)
    interpolation = cv2.INTER_CUBIC if size > image_rgb.shape[0] else cv2.INTER_AREA
    return cv2.resize(image_rgb, (size, size), interpolation=interpolation)


def align_at(image_rgb: np.ndarray, detector: FaceDetector, size: int) -> np.ndarray | None:
    """``image_rgb`` in the ArcFace template's frame at ``size`` x ``size``: the 112 template
    scaled by ``size / 112``, the framing of Arc2Face's training crops (112 upsampled). An
    aligned 112 crop (a DigiFace render) is resized; another image is detected and warped with
    ``norm_crop``'s transform, scaled; None when no face is found (and no fallback)."""
    return align_at_with_matrix(image_rgb, detector, size)[0]


def align_at_with_matrix(
    image_rgb: np.ndarray, detector: FaceDetector, size: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`align_at` and the 2x3 map from ``image_rgb``'s pixels to the result's."""
    check_image(image_rgb, "image_rgb")
    if is_aligned_crop(image_rgb, 112):
        return resize_square(image_rgb, size), resize_matrix((112, 112), (size, size))
    detections = detector.detect(image_rgb)
    if detections:
        matrix = face_align.estimate_norm(np.asarray(detections[0].kps, np.float32), 112)
        matrix = matrix * (size / 112)
        return cv2.warpAffine(image_rgb, matrix, (size, size), borderValue=0.0), matrix
    if detector.spec.fallback == "center_crop":
        return center_crop_align(image_rgb, size), center_crop_matrix(image_rgb.shape, size)
    return None, None
