"""Face detection: insightface's SCRFD on an explicit onnxruntime session."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from insightface.model_zoo.scrfd import SCRFD

from digi2real.face.session import make_session
from digi2real.weights.face_config import DetectorSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Detection:
    """One face in the coordinates of the image given to :meth:`FaceDetector.detect`."""

    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32: eyes, nose, mouth corners (insightface order)
    score: float


def check_image(image: np.ndarray, name: str = "image") -> None:
    """Raise ValueError unless ``image`` is an HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")


def _resolve_model(weights: str | Path, file: str) -> Path:
    path = Path(weights)
    return path / file if path.is_dir() else path


class FaceDetector:
    """SCRFD detector returning faces sorted by score, in original image coordinates.

    ``weights`` is a weights directory (the model is ``weights / spec.file``) or the path
    of the model itself. Images are RGB; insightface's class gets BGR as it expects.
    """

    def __init__(self, spec: DetectorSpec, weights: str | Path, device: str = "cpu") -> None:
        self.spec = spec
        self.model_path = _resolve_model(weights, spec.file)
        self.session = make_session(self.model_path, device)
        # model_file=None keeps SCRFD in session-only mode: it never builds sessions of
        # its own (with providers we did not choose) for other input resolutions.
        self._scrfd = SCRFD(model_file=None, session=self.session)
        if not self._scrfd.use_kps:
            raise ValueError(
                f"{self.model_path.name} has no keypoint outputs; alignment needs a *_kps model"
            )
        fixed = self._scrfd.static_input_size
        wanted = (spec.input_size, spec.input_size)
        if fixed is not None and tuple(fixed) != wanted:
            raise ValueError(
                f"{self.model_path.name} has a fixed input of {fixed[0]}x{fixed[1]}, "
                f"but the detector spec asks for input_size {spec.input_size}"
            )
        self._scrfd.nms_thresh = spec.nms_threshold

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Faces in ``image_rgb`` (HxWx3 uint8 RGB), best score first."""
        check_image(image_rgb, "image_rgb")
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        height, width = bgr.shape[:2]
        scale_x = scale_y = 1.0
        pad_x = pad_y = 0
        if self.spec.pad_ratio > 0:
            # SCRFD shrinks the padded canvas to input_size anyway; shrinking the image
            # first keeps a large photo's canvas (1 + 2 * pad_ratio)^2 times smaller.
            canvas = (1 + 2 * self.spec.pad_ratio) * max(height, width)
            shrink = self.spec.input_size / canvas
            if shrink < 1:
                new_w, new_h = max(1, round(width * shrink)), max(1, round(height * shrink))
                bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
                scale_x, scale_y = new_w / width, new_h / height
            pad_x = round(self.spec.pad_ratio * bgr.shape[1])
            pad_y = round(self.spec.pad_ratio * bgr.shape[0])
            bgr = cv2.copyMakeBorder(
                bgr, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=(0, 0, 0)
            )
        size = (self.spec.input_size, self.spec.input_size)
        dets, kpss = self._scrfd.detect(bgr, input_size=size, det_thresh=self.spec.score_threshold)
        offset = np.array([pad_x, pad_y], dtype=np.float32)
        scale = np.array([scale_x, scale_y], dtype=np.float32)
        order = np.argsort(-dets[:, 4], kind="stable")
        return [
            Detection(
                bbox=((dets[i, :4].reshape(2, 2) - offset) / scale).reshape(4).astype(np.float32),
                kps=((kpss[i] - offset) / scale).astype(np.float32),
                score=float(dets[i, 4]),
            )
            for i in order
        ]
