"""One model copy: face detection/alignment/embedding + the Arc2Face generator, built from a
weights dir and a config. Runners build one Engine per worker."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.config import Config
from digi2real.data.images import encode_jpeg
from digi2real.face import (
    DetectorSpec,
    FaceDetector,
    FaceEmbedder,
    RecognizerSpec,
    locate_and_align,
)
from digi2real.generate import Arc2FaceGenerator, SamplerSettings
from digi2real.weights import WeightsDir, open_weights

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    # half precision convolutions on CPU are slow or unsupported; CPU runs are float32
    return "float32" if device == "cpu" else dtype


@dataclass
class GeneratedFace:
    image: np.ndarray  # generated RGB (resolution x resolution)
    crop: np.ndarray | None  # aligned 112x112 RGB
    embedding: np.ndarray | None  # (D,) unit, of the crop
    jpeg: bytes
    reason: str = ""


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
        self.detector = FaceDetector(self.detector_spec, weights.root, self.device)
        self.embedder = FaceEmbedder(self.recognizer_spec, weights.root, self.device)
        self.id_dim = self.embedder.dim

    def align(self, image: np.ndarray) -> tuple[np.ndarray | None, str]:
        result = locate_and_align(image, self.detector, self.recognizer_spec.input_size)
        if result.image is None:
            return None, "no face detected"
        return result.image, ""

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.embed(crops)


class Engine(FaceStack):
    """A :class:`FaceStack` plus the Arc2Face generator."""

    def __init__(self, config: Config, weights: WeightsDir, *, device: str = "auto") -> None:
        from digi2real.domain_shift import DomainShift

        super().__init__(config, weights, device=device)
        self.dtype = resolve_dtype(config.generation.dtype, self.device)
        shift = None
        if config.shift.method != "none" and config.shift.alpha > 0:
            shift = DomainShift.from_files(
                method=config.shift.method,
                alpha=config.shift.alpha,
                positions=config.shift.positions,
                real_path=Path(config.shift.real_stats),  # type: ignore[arg-type]
                synthetic_path=Path(config.shift.synthetic_stats),  # type: ignore[arg-type]
                encoder_digest=weights.file_digest("encoder"),
            )
        self.shift = shift
        self.settings = SamplerSettings(
            config.generation.sampler, config.generation.steps, config.generation.guidance
        )
        self.generator = Arc2FaceGenerator.from_weights(
            weights,
            id_dim=self.id_dim,
            device=self.device,
            dtype=self.dtype,
            settings=self.settings,
            shift=shift,
        )
        if config.generation.channels_last and self.device != "cpu":
            self.generator.unet.to(memory_format=torch.channels_last)
            self.generator.vae.to(memory_format=torch.channels_last)
        self.batch_size = config.generation.batch_size
        self.oom_events: list[str] = []

    @classmethod
    def from_config(cls, config: Config, *, device: str = "auto") -> Engine:
        if config.weights is None:
            raise ValueError("config.weights is not set: pass --weights DIR")
        return cls(config, open_weights(config.weights), device=device)

    # -- generation -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": self.settings.sampler,
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "dtype": self.dtype,
            "shift_method": self.config.shift.method if self.shift else "none",
            "shift_alpha": float(self.config.shift.alpha) if self.shift else 0.0,
            "weights_digest": self.weights.digest,
        }

    def _generate_batch(self, targets: np.ndarray, seeds: list[int]) -> np.ndarray:
        return self.generator(targets, seeds=seeds).images

    def generate(self, targets: np.ndarray, seeds: list[int]) -> list[GeneratedFace]:
        """Generate, align, embed and encode; batches of ``batch_size``, halved on CUDA OOM."""
        images: list[np.ndarray] = []
        start = 0
        while start < len(targets):
            size = min(self.batch_size, len(targets) - start)
            try:
                batch = self._generate_batch(
                    targets[start : start + size], seeds[start : start + size]
                )
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch_size = max(1, size // 2)
                event = (
                    f"CUDA out of memory at batch {size}; continuing with batch {self.batch_size}"
                )
                logger.warning(event)
                self.oom_events.append(event)
                continue
            images.extend(batch)
            start += size
        return self.postprocess(images)

    def postprocess(self, images: list[np.ndarray]) -> list[GeneratedFace]:
        results: list[GeneratedFace] = []
        crops: list[np.ndarray] = []
        for image in images:
            crop, why = self.align(image)
            results.append(GeneratedFace(image, crop, None, b"", why))
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
