"""The optional attribute models of insightface's buffalo_l pack, on explicit onnxruntime
sessions: ``1k3d68.onnx`` (68 landmarks in 3D and the head pose fitted to them) and
``genderage.onnx`` (apparent gender and age).

Both are optional weights components (``digi2real weights download --with
landmarks3d,genderage``; the tiny profile always has random stand-ins). :class:`AttributeModels`
opens the ones a weights dir has and estimates, for one detected face (:data:`MODEL_ESTIMATES`):

- ``landmarks3d``: ``yaw_3d_est``, ``pitch_3d_est``, ``roll_3d_est`` in degrees, with the signs
  of :mod:`digi2real.face.pose`: positive yaw turns the nose toward the image's right, positive
  pitch tilts it down, positive roll leans the head's top toward the image's right (clockwise
  on screen, as :func:`digi2real.face.landmarks.roll_from_eyes`);
- ``genderage``: ``age_est`` (years, a whole number: insightface rounds it) and ``gender_est``
  (1.0 male, 0.0 female: insightface's ``Attribute`` gives 1 for male).

Pose signs. insightface's ``Landmark`` fits its mean 3D shape (``meanshape_68.pkl``: x toward
the image's right, y down, the nose tip toward +z, the camera) to the predicted points by an
affine map, takes the rotation from the map's first two rows (the image x and y; the third row
is their cross product, so the model's depth output plays no part) and reads it with
``transform.matrix2angle`` as ``[pitch, yaw, roll]``: rotations about the shape's x, y and z
axes. Rotating the mean shape by +a about x moves the nose tip up in the image and gives pitch
+a; about y it moves the nose tip to the image's right, yaw +a; about z it turns the eye line
clockwise on screen, roll +a (``tests/test_attribute_models.py`` checks each through
insightface's own code, and against :func:`digi2real.face.pose.estimate_pose`). So yaw and roll
keep insightface's sign and pitch is negated.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.landmark import Landmark

from digi2real.data.attributes import MODEL_ESTIMATES
from digi2real.face.detect import check_image
from digi2real.face.session import make_session

if TYPE_CHECKING:
    from digi2real.face.detect import Detection
    from digi2real.weights.manifest import WeightsDir

logger = logging.getLogger(__name__)

# insightface's pose [pitch, yaw, roll] -> digi2real's (see the module's docstring)
YAW_SIGN, PITCH_SIGN, ROLL_SIGN = 1.0, -1.0, 1.0


class _Face(dict):
    """The face record insightface's model classes read (``face.bbox``) and write into
    (``face["pose"]``, ``face["age"]``...), as its ``app.common.Face`` without importing
    ``insightface.app``."""

    def __init__(self, bbox: np.ndarray) -> None:
        super().__init__(bbox=bbox)
        self.bbox = bbox


def model_file(weights: WeightsDir, group: str) -> Path:
    """The file of the optional component ``group`` in ``weights`` (FileNotFoundError, saying
    how to fetch it, when the dir has none)."""
    if group not in MODEL_ESTIMATES:
        raise ValueError(f"unknown attribute model {group!r}; valid: {', '.join(MODEL_ESTIMATES)}")
    weights.require(group)
    [entry] = [f for f in weights.files if f.get("optional") == group]
    return weights.root / entry["path"]


class AttributeModels:
    """The attribute models a weights dir has (:attr:`available`), on ``device``.

    A dir without them is not an error: :attr:`available` is then empty and :meth:`estimate`
    returns ``{}``. Images are RGB; insightface's classes get BGR, as they expect.
    """

    def __init__(self, weights: WeightsDir, device: str = "cpu") -> None:
        self.weights = weights
        self.device = device
        self.paths: dict[str, Path] = {}
        self._landmark: Landmark | None = None
        self._attribute: Attribute | None = None
        if weights.has("landmarks3d"):
            path = model_file(weights, "landmarks3d")
            # model_file is read for its first nodes' names (the input normalisation); the
            # session is ours, with the providers `device` asks for
            self._landmark = Landmark(model_file=str(path), session=make_session(path, device))
            if not self._landmark.require_pose:
                raise ValueError(
                    f"{path} is not a 68-point 3D landmark model (1k3d68.onnx: output width "
                    f"3309, got task {self._landmark.taskname})"
                )
            self.paths["landmarks3d"] = path
        if weights.has("genderage"):
            path = model_file(weights, "genderage")
            self._attribute = Attribute(model_file=str(path), session=make_session(path, device))
            if self._attribute.taskname != "genderage":
                raise ValueError(
                    f"{path} is not a gender/age model (genderage.onnx: output width 3, got "
                    f"task {self._attribute.taskname})"
                )
            self.paths["genderage"] = path
        self.available: tuple[str, ...] = tuple(g for g in MODEL_ESTIMATES if g in self.paths)

    @property
    def names(self) -> tuple[str, ...]:
        """The estimates :meth:`estimate` returns, in order."""
        return tuple(name for group in self.available for name in MODEL_ESTIMATES[group])

    @property
    def providers(self) -> dict[str, list[str]]:
        models: dict[str, Any] = {"landmarks3d": self._landmark, "genderage": self._attribute}
        return {g: models[g].session.get_providers() for g in self.available}

    def file_digests(self) -> dict[str, str]:
        """Each available model's :meth:`~digi2real.weights.manifest.WeightsDir.file_digest`
        (optional files are outside the dir's digest: a run that uses one records this)."""
        components = {
            f["optional"]: f["component"] for f in self.weights.files if f.get("optional")
        }
        return {g: self.weights.file_digest(components[g]) for g in self.available}

    def estimate(
        self, image_rgb: np.ndarray, detection: Detection | None
    ) -> dict[str, float | None]:
        """The estimates of the available models for the face ``detection`` (its box in
        ``image_rgb``'s coordinates) of ``image_rgb`` (HxWx3 uint8 RGB); every value None
        when ``detection`` is None (no face)."""
        values: dict[str, float | None] = dict.fromkeys(self.names)
        if detection is None or not self.available:
            return values
        check_image(image_rgb, "image_rgb")
        bbox = np.asarray(detection.bbox, np.float32).reshape(4)
        if not np.isfinite(bbox).all() or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise ValueError(f"detection bbox must be finite x1 < x2, y1 < y2, got {bbox}")
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        face = _Face(bbox)
        if self._landmark is not None:
            self._landmark.get(bgr, face)
            pitch, yaw, roll = (float(v) for v in face["pose"])
            values["yaw_3d_est"] = YAW_SIGN * yaw
            values["pitch_3d_est"] = PITCH_SIGN * pitch
            values["roll_3d_est"] = ROLL_SIGN * roll
        if self._attribute is not None:
            gender, age = self._attribute.get(bgr, face)
            values["age_est"] = float(age)
            values["gender_est"] = float(gender)
        return {k: v if v is None or math.isfinite(v) else None for k, v in values.items()}
