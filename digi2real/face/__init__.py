"""Face detection, alignment and ArcFace embedding through onnxruntime."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from digi2real.face.align import (
    ARCFACE_TEMPLATE,
    AlignResult,
    align_face,
    center_crop_align,
    is_aligned_crop,
    locate_and_align,
)
from digi2real.face.detect import Detection, DetectorSpec, FaceDetector
from digi2real.face.embed import FaceEmbedder, RecognizerSpec
from digi2real.face.session import make_session

FACE_CONFIG_NAME = "face.json"

__all__ = [
    "ARCFACE_TEMPLATE",
    "FACE_CONFIG_NAME",
    "AlignResult",
    "Detection",
    "DetectorSpec",
    "FaceDetector",
    "FaceEmbedder",
    "RecognizerSpec",
    "align_face",
    "center_crop_align",
    "export_tiny_detector",
    "export_tiny_recognizer",
    "is_aligned_crop",
    "load_face_config",
    "locate_and_align",
    "make_session",
    "save_face_config",
    "tiny_face_specs",
]

_TINY = ("export_tiny_detector", "export_tiny_recognizer", "tiny_face_specs")


def __getattr__(name: str) -> Any:
    # The tiny exporters need torch; importing it only when asked keeps inference light.
    if name in _TINY:
        from digi2real.face import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_face_config(weights_dir: str | Path) -> tuple[RecognizerSpec, DetectorSpec]:
    """Read ``weights_dir/face.json``: the recognizer and detector preprocessing specs."""
    path = Path(weights_dir) / FACE_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"face config not found: {path}")
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    missing = [
        key for key in ("recognizer", "detector") if not isinstance(data, dict) or key not in data
    ]
    if missing:
        raise ValueError(f"{path} lacks section(s) {missing}; expected 'recognizer' and 'detector'")
    return RecognizerSpec.from_dict(data["recognizer"]), DetectorSpec.from_dict(data["detector"])


def save_face_config(
    weights_dir: str | Path, recognizer: RecognizerSpec, detector: DetectorSpec
) -> Path:
    """Write ``weights_dir/face.json`` (sorted keys, so identical specs give identical bytes)."""
    path = Path(weights_dir) / FACE_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(
        {"recognizer": recognizer.to_dict(), "detector": detector.to_dict()},
        indent=2,
        sort_keys=True,
    )
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
