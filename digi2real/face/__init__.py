"""Face detection, alignment and ArcFace embedding through onnxruntime.

``session`` (explicit providers), ``detect`` (SCRFD), ``align`` (insightface's
``norm_crop``), ``embed`` (batched ArcFace), ``stack`` (the three of a weights dir, and the
post-processing of generated images) and ``images`` (:func:`embed_images`, the one path from
image files to embeddings that every caller uses).
"""

from __future__ import annotations

from digi2real.face.align import (
    ARCFACE_TEMPLATE,
    AlignResult,
    align_face,
    center_crop_align,
    is_aligned_crop,
    locate_and_align,
)
from digi2real.face.detect import Detection, FaceDetector
from digi2real.face.embed import FaceEmbedder
from digi2real.face.session import make_session
from digi2real.weights.face_config import DetectorSpec, RecognizerSpec

__all__ = [
    "ARCFACE_TEMPLATE",
    "AlignResult",
    "Detection",
    "DetectorSpec",
    "FaceDetector",
    "FaceEmbedder",
    "RecognizerSpec",
    "align_face",
    "center_crop_align",
    "is_aligned_crop",
    "locate_and_align",
    "make_session",
]
