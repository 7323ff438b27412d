"""Face detection, alignment and ArcFace embedding through onnxruntime.

``session`` (explicit providers), ``detect`` (SCRFD), ``align`` (insightface's
``norm_crop``), ``embed`` (batched ArcFace), ``stack`` (the three of a weights dir, and the
post-processing of generated images) and ``images`` (:func:`embed_images`, the one path from
image files to embeddings that every caller uses).
"""

from __future__ import annotations

import importlib
from typing import Any

# imported when first used: ``face.pose`` (pure numpy) must not pull onnxruntime and
# insightface into a command that only reads landmarks-free files
_EXPORTS = {
    "ARCFACE_TEMPLATE": "digi2real.face.align",
    "AlignResult": "digi2real.face.align",
    "align_face": "digi2real.face.align",
    "center_crop_align": "digi2real.face.align",
    "is_aligned_crop": "digi2real.face.align",
    "locate_and_align": "digi2real.face.align",
    "Detection": "digi2real.face.detect",
    "FaceDetector": "digi2real.face.detect",
    "FaceEmbedder": "digi2real.face.embed",
    "make_session": "digi2real.face.session",
    "DetectorSpec": "digi2real.weights.face_config",
    "RecognizerSpec": "digi2real.weights.face_config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
