"""Attributes estimated from an image, for sources that ship none (DigiFace-1M): every name
ends in ``_est`` (:data:`digi2real.data.attributes.ESTIMATES`).

- ``yaw_est``, ``pitch_est`` (degrees): :func:`digi2real.face.pose.estimate_pose` of the
  detector's five points (a generic 3D face; signs as there);
- ``roll_est`` (degrees): the detected eye line's angle, positive clockwise on screen;
- ``face_size_est`` (pixels): the detected box's side, sqrt(width x height), in the image as
  it is on disk;
- ``sharpness_est``: the variance of the grey image's Laplacian (3x3), higher is sharper;
- ``brightness_est``: the mean grey level, 0-255 (ITU-R BT.601 weights);
- with the optional buffalo_l models (:mod:`digi2real.face.attribute_models`), when the weights
  dir holds them: ``yaw_3d_est``, ``pitch_3d_est``, ``roll_3d_est`` (1k3d68's 68 3D
  landmarks), ``age_est`` and ``gender_est`` (genderage).

The detector pads the image, so aligned 112x112 crops are found. Where no face is found the
face attributes are missing (None); sharpness and brightness are always measured.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from digi2real.face.landmarks import roll_from_eyes
from digi2real.face.pose import estimate_pose


def image_quality(image_rgb: np.ndarray) -> dict[str, float]:
    grey = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    return {
        "sharpness_est": float(cv2.Laplacian(grey, cv2.CV_64F, ksize=3).var()),
        "brightness_est": float(grey.mean()),
    }


def estimate_attributes(
    image_rgb: np.ndarray, detector: Any, models: Any = None
) -> dict[str, float | None]:
    """Every estimate of one RGB image; ``detector`` a
    :class:`~digi2real.face.detect.FaceDetector`, ``models`` the optional
    :class:`~digi2real.face.attribute_models.AttributeModels` (their estimates join in)."""
    values: dict[str, float | None] = {
        "yaw_est": None,
        "pitch_est": None,
        "roll_est": None,
        "face_size_est": None,
    }
    detections = detector.detect(image_rgb)
    best = detections[0] if detections else None
    if models is not None:
        values.update(models.estimate(image_rgb, best))
    if best is not None:
        kps = np.asarray(best.kps, np.float64)
        values["yaw_est"], values["pitch_est"] = estimate_pose(kps)
        values["roll_est"] = roll_from_eyes(kps)
        x1, y1, x2, y2 = (float(v) for v in best.bbox)
        values["face_size_est"] = float(np.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0)))
    values.update(image_quality(image_rgb))
    return values
