"""Landmark geometry: the 2x3 affine maps images go through, applied to points and masks, and
label fidelity (how far a face's detected five points lie from its carried landmarks).

Pixel coordinates are continuous with the centre of pixel (0, 0) at (0, 0), x right, y down:
the convention of ``cv2.warpAffine`` (a matrix maps source pixel centres to destination pixel
centres) and of the renderers' landmark files. ``cv2.resize`` follows the pixel-*area*
convention instead (edges align), so its map is ``x' = (x + 0.5) * s - 0.5``
(:func:`resize_matrix`).

Landmark sets: 70 points (iBUG-68, then the two pupils; FaceSynthetics and SynthFace) or 68
(iBUG-68 alone). The detector's five points are, in insightface's order, the eye on the
image's left, the eye on the image's right, the nose tip, the mouth corner on the image's left
and the one on its right; on a frontal face iBUG 36-41 is the eye on the image's left (the
subject's right eye) and its pupil is row 69.
"""

from __future__ import annotations

import cv2
import numpy as np

IGNORE = 255  # the mask value outside the render (FaceSynthetics' IGNORE class)
# iBUG-68 indices of the detector's nose tip and mouth corners
NOSE_TIP = 30
MOUTH_LEFT, MOUTH_RIGHT = 48, 54
# rows 68 and 69 of a 70-point set: the subject's left and right pupils
PUPIL_SUBJECT_LEFT, PUPIL_SUBJECT_RIGHT = 68, 69
EYE_IMAGE_LEFT = slice(36, 42)  # iBUG's subject-right eye contour
EYE_IMAGE_RIGHT = slice(42, 48)


def identity_matrix() -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def resize_matrix(source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """The map of ``cv2.resize`` from a (width, height) image to a (width, height) image."""
    sx, sy = target[0] / source[0], target[1] / source[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def crop_matrix(left: int, top: int) -> np.ndarray:
    """The map of taking the window whose top-left pixel is (left, top)."""
    return np.array([[1.0, 0.0, -float(left)], [0.0, 1.0, -float(top)]])


def compose(*matrices: np.ndarray) -> np.ndarray:
    """``compose(A, B)`` applies A then B (2x3 affine maps)."""
    result = np.eye(3)
    for matrix in matrices:
        full = np.vstack([np.asarray(matrix, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
        result = full @ result
    return result[:2]


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) points mapped by a 2x3 affine matrix (float64)."""
    points = np.asarray(points, np.float64)
    matrix = np.asarray(matrix, np.float64).reshape(2, 3)
    return points @ matrix[:, :2].T + matrix[:, 2]


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-id mask carried through ``matrix`` into a (width, height) frame: nearest
    neighbour (no class is ever blended into another), IGNORE where the source has no pixel."""
    return cv2.warpAffine(
        np.ascontiguousarray(mask, np.uint8),
        np.asarray(matrix, np.float64).reshape(2, 3),
        size,
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=IGNORE,
    )


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The detector's five points read from a 70- or 68-point set (68: eye centres for the
    pupils), in insightface's order."""
    points = np.asarray(landmarks, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] not in (68, 70):
        raise ValueError(f"landmarks must be (68, 2) or (70, 2), got {points.shape}")
    if points.shape[0] == 70:
        left_eye, right_eye = points[PUPIL_SUBJECT_RIGHT], points[PUPIL_SUBJECT_LEFT]
    else:
        left_eye = points[EYE_IMAGE_LEFT].mean(axis=0)
        right_eye = points[EYE_IMAGE_RIGHT].mean(axis=0)
    return np.stack(
        [left_eye, right_eye, points[NOSE_TIP], points[MOUTH_LEFT], points[MOUTH_RIGHT]]
    )


def nme(detected: np.ndarray, landmarks: np.ndarray) -> float:
    """Label fidelity: mean distance of the detected five points from the same points of the
    carried landmarks, in percent of the carried inter-pupil distance."""
    reference = five_points(landmarks)
    detected = np.asarray(detected, np.float64).reshape(5, 2)
    interpupil = float(np.linalg.norm(reference[1] - reference[0]))
    if not interpupil > 0:
        raise ValueError("carried landmarks have no inter-pupil distance")
    return float(np.linalg.norm(detected - reference, axis=1).mean() / interpupil * 100.0)


def roll_from_eyes(kps: np.ndarray) -> float:
    """In-plane rotation (degrees) of the eye line of five points: positive when the face's
    top leans toward the image's right (clockwise on screen)."""
    points = np.asarray(kps, np.float64).reshape(5, 2)
    dx, dy = points[1] - points[0]
    return float(np.degrees(np.arctan2(dy, dx)))
