"""The face models of a weights dir together: detector, aligner and recognizer (no diffusion
models), and the post-processing of generated images (detect, align, embed, JPEG)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from digi2real.config import Config
from digi2real.data.images import encode_jpeg
from digi2real.device import resolve_device
from digi2real.face.align import locate_and_align
from digi2real.face.detect import FaceDetector
from digi2real.face.embed import FaceEmbedder
from digi2real.weights import WeightsDir, open_weights
from digi2real.weights.face_config import DetectorSpec, RecognizerSpec


@dataclass
class GeneratedFace:
    image: np.ndarray  # generated RGB (resolution x resolution)
    crop: np.ndarray | None  # aligned 112x112 RGB
    embedding: np.ndarray | None  # (D,) unit, of the crop
    jpeg: bytes
    reason: str = ""
    # the 2x3 map from ``image``'s pixels to ``crop``'s, and the detected five points in
    # ``image``'s pixels (None: the crop was not detected, e.g. the centre-crop fallback)
    matrix: np.ndarray | None = None
    kps: np.ndarray | None = None


class FaceStack:
    """Detector + aligner + recognizer of a weights dir (no diffusion models)."""

    def __init__(self, config: Config, weights: WeightsDir, *, device: str = "auto") -> None:
        self.config = config
        self.weights = weights
        self.device = resolve_device(device if device != "auto" else config.run.device)
        if config.filter.fallback != "none" and weights.profile != "tiny":
            raise ValueError(
                f"filter.fallback={config.filter.fallback!r} is for the tiny profile only: a real "
                "profile never aligns without a detected face"
            )
        face = weights.face
        if not face:
            raise FileNotFoundError(
                f"{weights.root}/face.json missing: rebuild or re-download the weights"
            )
        self.recognizer_spec = RecognizerSpec.from_dict(face["recognizer"])
        detector_spec = DetectorSpec.from_dict(face["detector"])
        self.detector_spec = dataclasses.replace(detector_spec, fallback=config.filter.fallback)
        self._open_sessions()
        self.id_dim = self.embedder.dim

    def _open_sessions(self) -> None:
        # onnxruntime binds a session to its providers when it is created
        self.detector = FaceDetector(self.detector_spec, self.weights.root, self.device)
        self.embedder = FaceEmbedder(self.recognizer_spec, self.weights.root, self.device)

    def to(self, device: str) -> FaceStack:
        """The face models on ``device`` (their sessions are opened again there)."""
        self.device = resolve_device(device)
        self._open_sessions()
        return self

    @classmethod
    def from_config(cls, config: Config, *, device: str = "auto") -> FaceStack:
        if config.weights is None:
            raise ValueError("no weights: pass --weights DIR")
        return cls(config, open_weights(config.weights), device=device)

    def align(self, image: np.ndarray) -> tuple[np.ndarray | None, str]:
        result = locate_and_align(image, self.detector, self.recognizer_spec.input_size)
        if result.image is None:
            return None, "no face detected"
        return result.image, ""

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.embed(crops)

    def postprocess(self, images: list[np.ndarray]) -> list[GeneratedFace]:
        """Detect, align, embed and JPEG-encode generated images; per image, in order."""
        results: list[GeneratedFace] = []
        crops: list[np.ndarray] = []
        for image in images:
            aligned = locate_and_align(image, self.detector, self.recognizer_spec.input_size)
            crop = aligned.image
            kps = None if aligned.detection is None else np.asarray(aligned.detection.kps)
            why = "" if crop is not None else "no face detected"
            results.append(GeneratedFace(image, crop, None, b"", why, aligned.matrix, kps))
            if crop is not None:
                crops.append(crop)
        if crops:
            embeddings = iter(self.embed(np.stack(crops)))
            quality = self.config.output.jpeg_quality
            for face in results:
                if face.crop is not None:
                    face.embedding = next(embeddings)
                    face.jpeg = encode_jpeg(face.crop, quality=quality)
        return results
