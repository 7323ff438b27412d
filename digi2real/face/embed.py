"""ArcFace embeddings of aligned crops through onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from digi2real.face.session import make_session
from digi2real.weights.face_config import RecognizerSpec

logger = logging.getLogger(__name__)


def preprocess(aligned: np.ndarray, spec: RecognizerSpec) -> np.ndarray:
    """RGB uint8 (N, S, S, 3) -> float32 NCHW blob as the spec describes."""
    pixels = aligned if spec.color == "RGB" else aligned[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    blob = (pixels.astype(np.float32) - mean) / std
    return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))


def normalises_inside(model_path: Path) -> bool:
    """Whether the graph starts by subtracting and scaling its input itself.

    MXNet-converted ArcFace models do (insightface then feeds raw pixels, mean 0, std 1);
    a spec that normalises as well would silently produce meaningless embeddings.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node[:8]}
    return {"Sub", "Mul"} <= ops


class FaceEmbedder:
    """L2-normalised embeddings of aligned RGB crops, batched through onnxruntime (or the
    model's raw outputs, ``normalize=False``)."""

    def __init__(
        self,
        spec: RecognizerSpec,
        model_path: str | Path,
        device: str = "cpu",
        batch_size: int = 64,
        *,
        normalize: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # an image encoder's features (DINOv2, CLIP) are compared as they come out
        self.normalize = normalize
        path = Path(model_path)
        self.model_path = path / spec.file if path.is_dir() else path
        self.spec = spec
        self.batch_size = batch_size
        self.session = make_session(self.model_path, device)

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{self.model_path.name}: expected 1 input and 1 output, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        in_shape = inputs[0].shape
        if len(in_shape) != 4 or in_shape[1] != 3:
            raise ValueError(f"{self.model_path.name}: expected an Nx3xHxW input, got {in_shape}")
        model_hw = tuple(in_shape[2:4])
        if all(isinstance(v, int) for v in model_hw) and model_hw != (spec.input_size,) * 2:
            raise ValueError(
                f"{self.model_path.name} takes {model_hw[0]}x{model_hw[1]} input, "
                f"but the recognizer spec says input_size {spec.input_size}"
            )
        out_shape = outputs[0].shape
        if len(out_shape) != 2 or not isinstance(out_shape[1], int):
            raise ValueError(f"{self.model_path.name}: expected an (N, D) output, got {out_shape}")
        self.dim: int = out_shape[1]
        if normalises_inside(self.model_path) and (spec.mean, spec.std) != ((0.0,) * 3, (1.0,) * 3):
            logger.warning(
                "%s subtracts and scales its input inside the graph, yet the recognizer spec "
                "also normalises (mean %s, std %s); check face.json",
                self.model_path.name,
                list(spec.mean),
                list(spec.std),
            )
        self._fixed_batch = in_shape[0] if isinstance(in_shape[0], int) else None
        self._input_name = inputs[0].name
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _check(self, aligned: np.ndarray) -> None:
        size = self.spec.input_size
        if not isinstance(aligned, np.ndarray):
            raise ValueError(f"aligned must be a numpy array, got {type(aligned).__name__}")
        if aligned.dtype != np.uint8:
            raise ValueError(f"aligned must be uint8, got dtype {aligned.dtype}")
        if aligned.ndim != 4 or aligned.shape[1:] != (size, size, 3):
            raise ValueError(f"aligned must have shape (N, {size}, {size}, 3), got {aligned.shape}")
        if aligned.shape[0] == 0:
            raise ValueError("aligned is an empty batch (N = 0)")

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB aligned crops -> (N, dim) float32 unit vectors (as the model
        returns them with ``normalize=False``)."""
        self._check(aligned)
        step = self._fixed_batch or self.batch_size
        chunks = []
        for start in range(0, len(aligned), step):
            chunk = aligned[start : start + step]
            count = len(chunk)
            if self._fixed_batch and count < step:
                # A model exported with a fixed batch needs a full one; pad and drop.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - count, axis=0)])
            blob = preprocess(chunk, self.spec).astype(self._input_dtype, copy=False)
            (out,) = self.session.run(None, {self._input_name: blob})
            chunks.append(np.asarray(out, dtype=np.float32)[:count])
        features = np.concatenate(chunks)
        if not np.isfinite(features).all():
            bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
            raise FloatingPointError(
                f"{self.model_path.name} gave non-finite embeddings for rows {bad[:10].tolist()}"
            )
        if not self.normalize:
            return features
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        if (norms == 0).any():
            bad = np.flatnonzero(norms[:, 0] == 0)
            raise FloatingPointError(
                f"{self.model_path.name} gave zero embeddings for rows {bad[:10].tolist()}"
            )
        return (features / norms).astype(np.float32)
