"""``face.json``: each face model's preprocessing, data rather than code.

A weights dir's ``face.json`` has a ``recognizer`` section (:class:`RecognizerSpec`: file,
input size, channel order, mean/std) and a ``detector`` section (:class:`DetectorSpec`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import COLORS, FALLBACKS
from digi2real.data import fsio

FACE_CONFIG = "face.json"


DETECTOR_KINDS = ("scrfd",)


def _check_keys(section: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; valid keys: {sorted(allowed)}")


@dataclass(frozen=True)
class DetectorSpec:
    """How to run the face detector; the ``detector`` section of ``face.json``.

    ``pad_ratio``: each image is zero-padded by this fraction of its own width/height on
    every side before detection, because SCRFD at 640x640 misses faces that fill a tight
    aligned crop. ``fallback``: what to do with an unaligned image where no face is found
    (``"none"``: reject it; ``"center_crop"``: square centre crop, for the tiny profile
    whose random detector never finds a face).
    """

    file: str = "scrfd_10g_bnkps.onnx"
    kind: str = "scrfd"
    input_size: int = 640
    score_threshold: float = 0.5
    nms_threshold: float = 0.4
    pad_ratio: float = 1.0
    fallback: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"detector kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"detector fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not isinstance(self.input_size, int) or self.input_size < 32 or self.input_size % 32:
            raise ValueError(
                f"detector input_size must be a positive multiple of 32, got {self.input_size!r}"
            )
        for name in ("score_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"detector {name} must be in [0, 1], got {value!r}")
        if not self.pad_ratio >= 0.0:
            raise ValueError(f"detector pad_ratio must be >= 0, got {self.pad_ratio!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorSpec:
        _check_keys("detector", data, {f.name for f in fields(cls)})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RecognizerSpec:
    """Preprocessing of the recognition model; the ``recognizer`` section of ``face.json``.

    ``color`` is the channel order the model expects; ``mean`` and ``std`` are per channel
    in that order: the network sees ``(pixel - mean) / std``.
    """

    file: str = "arcface.onnx"
    input_size: int = 112
    color: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"recognizer color must be one of {COLORS}, got {self.color!r}")
        if not isinstance(self.input_size, int) or self.input_size <= 0:
            raise ValueError(
                f"recognizer input_size must be a positive int, got {self.input_size!r}"
            )
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not np.isfinite(value).all():
                raise ValueError(f"recognizer {name} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"recognizer std must be positive, got {self.std!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecognizerSpec:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown recognizer keys {unknown}; valid keys: {sorted(allowed)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


def load_face_config(weights_dir: str | Path) -> tuple[RecognizerSpec, DetectorSpec]:
    """Read ``weights_dir/face.json``: the recognizer and detector preprocessing specs."""
    path = Path(weights_dir) / FACE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"face config not found: {path}")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8, not JSON
        raise ValueError(f"{path}: not a JSON face config ({error})") from None
    missing = [
        key for key in ("recognizer", "detector") if not isinstance(data, dict) or key not in data
    ]
    if missing:
        raise ValueError(f"{path} lacks section(s) {missing}; expected 'recognizer' and 'detector'")
    try:
        for section in ("recognizer", "detector"):
            if not isinstance(data[section], dict):
                raise ValueError(f"'{section}' must be an object")
        return RecognizerSpec.from_dict(data["recognizer"]), DetectorSpec.from_dict(
            data["detector"]
        )
    except (ValueError, TypeError) as error:  # a value of the wrong type or range
        raise ValueError(f"{path}: {error}") from None


def save_face_config(
    weights_dir: str | Path, recognizer: RecognizerSpec, detector: DetectorSpec
) -> Path:
    """Write ``weights_dir/face.json`` (sorted keys, so identical specs give identical bytes)."""
    text = json.dumps(
        {"recognizer": recognizer.to_dict(), "detector": detector.to_dict()},
        indent=2,
        sort_keys=True,
    )
    return fsio.atomic_write_bytes(Path(weights_dir) / FACE_CONFIG, (text + "\n").encode())
