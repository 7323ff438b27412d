"""Head pose (yaw, pitch) from the detector's five landmarks: a pure function of points.

Five points (eyes, nose tip, mouth corners) fix a weak-perspective camera on a generic 3D face:
the ArcFace template's frontal positions with typical depths (the nose tip in front of the
eyes). The 2x3 projection is fitted by least squares, its rows orthonormalised into a
rotation, and the angles read from the rotation's third row — the face's normal — which an
in-plane rotation, a scale or a shift of the points does not change: the landmarks of an
aligned crop give the pose of the original image.

It is an estimate for comparing pose *spread* (does a dataset keep its renders' profiles?),
not a calibrated angle: a generic 3D shape and five points cannot be more. Signs: positive
yaw turns the face toward the image's right (the nose moves right), positive pitch tilts it
down (the nose moves down).
"""

from __future__ import annotations

import numpy as np

# Frontal landmark positions (the ArcFace 112x112 template, y pointing up, centred) and
# depths toward the camera, in template pixels. The template's ~35 px between the eyes is
# ~62 mm; the generic head-pose model's proportions (nose tip ~27 mm in front of the outer eye
# corners, mouth corners ~25 mm behind the nose tip, pupils ~9 mm in front of the outer
# corners) put the nose tip ~18 mm (~10 px) in front of the pupils and the mouth corners
# ~7 mm (~4 px) behind them.
_TEMPLATE_2D = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
_DEPTH = np.array([0.0, 0.0, 10.0, -4.0, -4.0])
MODEL_3D = np.column_stack(
    [
        _TEMPLATE_2D[:, 0] - _TEMPLATE_2D[:, 0].mean(),
        -(_TEMPLATE_2D[:, 1] - _TEMPLATE_2D[:, 1].mean()),
        _DEPTH - _DEPTH.mean(),
    ]
)


def estimate_pose(kps: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees from (5, 2) landmarks in image coordinates (x right, y down),
    in insightface's order: left eye, right eye, nose, left mouth corner, right mouth corner."""
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"kps must be a finite (5, 2) array, got shape {points.shape}")
    image = np.column_stack([points[:, 0], -points[:, 1]])  # y up, as the model
    image = image - image.mean(axis=0)
    if np.linalg.norm(image) == 0:
        raise ValueError("kps are all the same point")
    projection, *_ = np.linalg.lstsq(MODEL_3D, image, rcond=None)  # (3, 2): image = model @ P
    first, second = projection.T
    first = first / np.linalg.norm(first)
    second = second - (second @ first) * first
    second = second / np.linalg.norm(second)
    # the camera's viewing axis in the face's frame: unchanged by an in-plane rotation
    normal = np.cross(first, second)
    yaw = np.degrees(np.arcsin(np.clip(-normal[0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(normal[1], normal[2]))
    return float(yaw), float(pitch)


def pose_spread(yaws: np.ndarray) -> dict[str, float | int | None]:
    """How varied a set of angles is: count, min, max, range and standard deviation."""
    values = np.asarray(yaws, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"count": 0, "min": None, "max": None, "range": None, "std": None}
    return {
        "count": int(values.size),
        "min": round(float(values.min()), 2),
        "max": round(float(values.max()), 2),
        "range": round(float(values.max() - values.min()), 2),
        "std": round(float(values.std()), 2),
    }
