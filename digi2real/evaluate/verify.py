"""Face verification on insightface ``.bin`` benchmarks (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

A ``.bin`` is a pickle of ``(images, issame)``: ``2 * len(issame)`` encoded images, pair
``i`` being images ``2i`` and ``2i + 1``. Pickles execute code when loaded, so they are read
with an unpickler that refuses every global: only builtin containers, bytes, str, ints,
floats, bools and None get through. Python 2 pickles (the published files) load with
``encoding="bytes"``. Refused as well, by construction: numpy arrays or numpy bools (they
are pickled as references to numpy functions), and Python 3 ``bytes`` pickled with protocol
< 3 (pickled as a call to ``_codecs.encode``); re-save such files with protocol >= 3.

The protocol is insightface ``eval/verification.py``'s: the embedding of an image is the
sum of the network's outputs on it and on its horizontal flip, L2-normalised; the squared
distance of each pair is thresholded; 10 contiguous folds, the threshold in
``arange(0, 4, 0.01)`` with the best accuracy on the 9 other folds applied to each; the
mean and standard deviation of the 10 fold accuracies.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from digi2real.data import fsio
from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.train import BACKBONE_NAME, CHECKPOINT_NAME, load_checkpoint

logger = logging.getLogger(__name__)

# Column order of the synthetic-data face-recognition papers (DCFace, Digi2Real, ...).
BENCHMARKS = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
    "cplfw": "CPLFW",
}
DEFAULT_NAMES = tuple(BENCHMARKS)
IMAGE_SIZE = 112
THRESHOLDS = np.arange(0, 4, 0.01)

Embedder = Callable[[np.ndarray], np.ndarray]
"""uint8 RGB batch (N, 112, 112, 3) -> raw (unnormalised) embeddings (N, D)."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """Read and check a verification ``.bin`` without executing anything it contains."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        with open(path, "rb") as handle:
            data = _NoGlobalsUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # a malformed pickle raises many types; all mean "not a .bin"
        raise ValueError(f"{path}: not a plain (images, issame) pickle: {error}") from error
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{path}: expected a pair (images, issame), got {type(data).__name__}")
    images, issame = data
    if not isinstance(images, list | tuple) or not all(
        isinstance(item, bytes | bytearray) for item in images
    ):
        raise ValueError(f"{path}: images must be a list of encoded image bytes")
    if not isinstance(issame, list | tuple) or not all(type(item) is bool for item in issame):
        raise ValueError(f"{path}: issame must be a list of bools")
    if not issame or len(images) != 2 * len(issame):
        raise ValueError(
            f"{path}: expected 2 images per pair, got {len(images)} images for {len(issame)} pairs"
        )
    return [bytes(item) for item in images], list(issame)


def decode_images(images: Sequence[bytes], source: str = "images") -> np.ndarray:
    """Encoded images -> uint8 RGB (N, 112, 112, 3)."""
    out = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise ValueError(f"{source}: image {index} does not decode: {error}") from error
        if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{source}: image {index} is {pixels.shape[:2]}, expected 112x112")
        out[index] = pixels
    return out


def flip_embeddings(embedder: Embedder, images: np.ndarray) -> np.ndarray:
    """L2-normalised sum of the embeddings of each image and of its horizontal flip."""
    plain = np.asarray(embedder(images), dtype=np.float64)
    flipped = np.asarray(embedder(np.ascontiguousarray(images[:, :, ::-1])), dtype=np.float64)
    summed = plain + flipped
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return summed / np.maximum(norms, 1e-12)


def fold_accuracies(
    embeddings: np.ndarray, issame: Sequence[bool], folds: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy and chosen threshold (on squared L2 distance).

    Folds are contiguous and unshuffled, the first ``n % folds`` one pair larger (as
    sklearn's KFold); ties between thresholds go to the smallest.
    """
    actual = np.asarray(issame, dtype=bool)
    if embeddings.shape[0] != 2 * actual.size:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {actual.size} pairs")
    if actual.size < folds:
        raise ValueError(f"{actual.size} pairs cannot make {folds} folds")
    dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), axis=1)
    correct = (dist[None, :] < THRESHOLDS[:, None]) == actual[None, :]
    accuracies, thresholds = np.empty(folds), np.empty(folds)
    for fold, test in enumerate(np.array_split(np.arange(actual.size), folds)):
        train = np.ones(actual.size, dtype=bool)
        train[test] = False
        best = int(np.argmax(correct[:, train].sum(axis=1)))
        accuracies[fold] = correct[best, test].mean()
        thresholds[fold] = THRESHOLDS[best]
    return accuracies, thresholds


@dataclass
class VerificationResult:
    name: str
    column: str
    accuracy: float
    std: float
    num_pairs: int
    fold_accuracies: list[float]
    thresholds: list[float]


@dataclass
class VerificationReport:
    model: str
    results: list[VerificationResult] = field(default_factory=list)

    @property
    def average(self) -> float:
        return float(np.mean([r.accuracy for r in self.results])) if self.results else float("nan")

    def ordered(self) -> list[VerificationResult]:
        """Results in the papers' column order, other sets after them in the given order."""
        known = [n for n in BENCHMARKS if any(r.name == n for r in self.results)]
        rank = {name: i for i, name in enumerate(known)}
        return sorted(self.results, key=lambda r: rank.get(r.name, len(rank)))

    def to_markdown(self) -> str:
        ordered = self.ordered()
        header = ["Model", *[r.column for r in ordered], "Avg"]
        cells = [
            self.model,
            *[f"{100 * r.accuracy:.2f} ± {100 * r.std:.2f}" for r in ordered],
            f"{100 * self.average:.2f}",
        ]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            "| " + " | ".join(cells) + " |",
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "protocol": "insightface verification: flip-sum embeddings, 10-fold accuracy",
            "columns": [r.column for r in self.ordered()] + ["Avg"],
            "results": [asdict(r) for r in self.ordered()],
            "average": self.average,
        }


class TorchEmbedder:
    """A torch backbone as an :data:`Embedder` (input ``(pixel - 127.5) / 127.5``, RGB)."""

    def __init__(self, module: nn.Module, device: str = "cpu", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = torch.from_numpy(
                np.ascontiguousarray(images[start : start + self.batch_size].transpose(0, 3, 1, 2))
            )
            batch = (batch.to(self.device).float() - 127.5) / 127.5
            outputs.append(self.module(batch).float().cpu().numpy())
        return np.concatenate(outputs)


class OnnxEmbedder:
    """An ONNX recogniser (e.g. insightface ``w600k_r50.onnx``) as an :data:`Embedder`."""

    def __init__(
        self, model_path: str | Path, device: str = "cpu", batch_size: int = 64, spec: Any = None
    ) -> None:
        from digi2real.face.embed import RecognizerSpec
        from digi2real.face.session import make_session

        self.spec = spec or RecognizerSpec()
        self.session = make_session(model_path, device)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        fixed = model_input.shape[0]
        # Some exports fix the batch dimension; honour it rather than fail at run time.
        self.batch_size = fixed if isinstance(fixed, int) and fixed > 0 else batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from digi2real.face.embed import preprocess

        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            blob = preprocess(images[start : start + self.batch_size], self.spec)
            outputs.append(self.session.run(None, {self.input_name: blob})[0])
        return np.concatenate(outputs).astype(np.float32)


def load_backbone(path: str | Path) -> nn.Module:
    """A trained backbone from CKPT_DIR, its ``backbone.safetensors`` or ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / BACKBONE_NAME, path / CHECKPOINT_NAME]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no {BACKBONE_NAME} or {CHECKPOINT_NAME} in {path}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "backbone" not in metadata or "embedding_size" not in metadata:
            raise ValueError(f"{path}: no backbone/embedding_size metadata")
        module = get_backbone(metadata["backbone"], int(metadata["embedding_size"]))
        module.load_state_dict(load_file(str(path)))
        return module
    state = load_checkpoint(path)
    module = get_backbone(state["config"]["backbone"], int(state["config"]["embedding_size"]))
    module.load_state_dict(state["backbone"])
    return module


def load_embedder(
    model: str | Path | Embedder, device: str = "cpu", batch_size: int = 64
) -> Embedder:
    """An embedder from a callable, an ``.onnx`` file, or a training output (dir/file)."""
    if callable(model):
        return model
    path = Path(model)
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, device, batch_size)
    return TorchEmbedder(load_backbone(path), device, batch_size)


def evaluate_bin(
    path: str | Path, embedder: Embedder, name: str | None = None, folds: int = 10
) -> VerificationResult:
    path = Path(path)
    images, issame = load_bin(path)
    embeddings = flip_embeddings(embedder, decode_images(images, str(path)))
    accuracies, thresholds = fold_accuracies(embeddings, issame, folds)
    name = name or path.stem
    result = VerificationResult(
        name=name,
        column=BENCHMARKS.get(name, name),
        accuracy=float(accuracies.mean()),
        std=float(accuracies.std()),
        num_pairs=len(issame),
        fold_accuracies=[float(a) for a in accuracies],
        thresholds=[float(t) for t in thresholds],
    )
    logger.info("%s: %.4f ± %.4f (%d pairs)", name, result.accuracy, result.std, len(issame))
    return result


def verify(
    model: str | Path | Embedder,
    bins: str | Path,
    names: Sequence[str] = DEFAULT_NAMES,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    folds: int = 10,
    model_name: str | None = None,
) -> VerificationReport:
    """Evaluate ``model`` on ``bins/<name>.bin`` for each name; write ``out`` (.md) + .json."""
    bins = Path(bins)
    paths = [bins / f"{name}.bin" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        present = sorted(p.stem for p in bins.glob("*.bin")) if bins.is_dir() else []
        raise FileNotFoundError(f"verification sets not found: {missing}; present: {present}")
    embedder = load_embedder(model, device, batch_size)
    label = model_name or (str(model) if not callable(model) else type(model).__name__)
    report = VerificationReport(model=label)
    for name, path in zip(names, paths, strict=True):
        report.results.append(evaluate_bin(path, embedder, name, folds))
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: VerificationReport, out: str | Path) -> tuple[Path, Path]:
    """``out`` gets the Markdown table, the same stem with ``.json`` the full numbers."""
    markdown = Path(out)
    as_json = markdown.with_suffix(".json")
    as_text = json.dumps(report.to_json(), indent=2) + "\n"
    fsio.atomic_write_bytes(markdown, report.to_markdown().encode("utf-8"))
    fsio.atomic_write_bytes(as_json, as_text.encode("utf-8"))
    return markdown, as_json
