"""Face verification on insightface ``.bin`` benchmarks (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

The sets are read by :mod:`digi2real.evaluate.bins` (an allow-list unpickler: encoded or
decoded images, Python 2 or 3 pickles, nothing in the file runs).

The protocol is insightface ``eval/verification.py``'s: the embedding of an image is the
sum of the network's outputs on it and on its horizontal flip, L2-normalised; the squared
distance of each pair is thresholded; 10 contiguous folds, the threshold in
``arange(0, 4, 0.01)`` with the best accuracy on the 9 other folds applied to each; the
mean and standard deviation of the 10 fold accuracies.

An ONNX recognizer's input is described by a :class:`RecognizerSpec` (channel order, mean,
std, input size): from a ``face.json`` given or found next to the model, else ArcFace's
``(x - 127.5) / 127.5`` RGB 112x112. The report records the one used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from PIL import Image
from torch import nn

from digi2real.data import fsio
from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.bins import IMAGE_SIZE, decode_images, load_bin
from digi2real.evaluate.choices import BACKBONES, BENCHMARKS, DEFAULT_NAMES
from digi2real.evaluate.train import (
    BACKBONE_NAME,
    CHECKPOINT_NAME,
    brief,
    checkpoint_backbone,
    load_checkpoint,
)
from digi2real.markdown import text as markdown_text
from digi2real.weights.face_config import FACE_CONFIG, RecognizerSpec

logger = logging.getLogger(__name__)

# Column order of the synthetic-data face-recognition papers (DCFace, Digi2Real, ...).
THRESHOLDS = np.arange(0, 4, 0.01)
ARCFACE_SOURCE = "default (ArcFace)"
# What digi2real.evaluate.data feeds the backbones it trains; their checkpoints get the same.
TRAINING_PREPROCESSING = {
    "color": "RGB",
    "input_size": IMAGE_SIZE,
    "mean": [127.5] * 3,
    "std": [127.5] * 3,
    "source": "training preprocessing",
}

Embedder = Callable[[np.ndarray], np.ndarray]
"""uint8 RGB batch (N, 112, 112, 3) -> raw (unnormalised) embeddings (N, D)."""

__all__ = [
    "BENCHMARKS",
    "DEFAULT_NAMES",
    "Embedder",
    "OnnxEmbedder",
    "TorchEmbedder",
    "VerificationReport",
    "VerificationResult",
    "decode_images",
    "evaluate_bin",
    "fold_accuracies",
    "load_backbone",
    "load_bin",
    "load_embedder",
    "read_recognizer_spec",
    "recognizer_spec",
    "verify",
    "write_report",
]


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
    # what the model was fed (color, input_size, mean, std, source); None for a callable
    preprocessing: dict[str, Any] | None = None

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
        # the model's name and the sets' names are user text (file names): escaped
        header = ["Model", *[markdown_text(r.column) for r in ordered], "Avg"]
        cells = [
            markdown_text(self.model),
            *[f"{100 * r.accuracy:.2f} ± {100 * r.std:.2f}" for r in ordered],
            f"{100 * self.average:.2f}",
        ]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            "| " + " | ".join(cells) + " |",
        ]
        if self.preprocessing is not None:
            lines += [
                "",
                f"Preprocessing: {markdown_text(describe_preprocessing(self.preprocessing))}",
            ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "protocol": "insightface verification: flip-sum embeddings, 10-fold accuracy",
            "columns": [r.column for r in self.ordered()] + ["Avg"],
            "results": [asdict(r) for r in self.ordered()],
            "average": self.average,
            "preprocessing": self.preprocessing,
        }


def describe_preprocessing(preprocessing: dict[str, Any]) -> str:
    """One line: ``RGB 112x112, mean 127.5,127.5,127.5, std 127.5,127.5,127.5 (source)``."""

    def numbers(values: Sequence[float]) -> str:
        return ",".join(f"{float(v):g}" for v in values)

    size = preprocessing["input_size"]
    return (
        f"{preprocessing['color']} {size}x{size}, mean {numbers(preprocessing['mean'])}, "
        f"std {numbers(preprocessing['std'])} ({preprocessing['source']})"
    )


def spec_record(spec: RecognizerSpec, source: str) -> dict[str, Any]:
    """The report's record of an ONNX model's preprocessing (the spec's ``file`` is not used)."""
    data = spec.to_dict()
    return {
        "color": data["color"],
        "input_size": data["input_size"],
        "mean": data["mean"],
        "std": data["std"],
        "source": source,
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
    """An ONNX recogniser (e.g. insightface ``w600k_r50.onnx``) as an :data:`Embedder`.

    ``spec`` says what the network expects (channel order, ``(x - mean) / std``, input
    size); the 112x112 ``.bin`` images are resized to ``spec.input_size`` when it differs.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        batch_size: int = 64,
        spec: RecognizerSpec | None = None,
    ) -> None:
        from digi2real.face.embed import normalises_inside
        from digi2real.face.session import make_session

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec or RecognizerSpec()
        path = Path(model_path)
        self.session = make_session(path, device)
        model_input = self.session.get_inputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise ValueError(f"{path.name}: expected an Nx3xHxW input, got {shape}")
        size = self.spec.input_size
        model_hw = tuple(shape[2:4])
        if all(isinstance(v, int) for v in model_hw) and model_hw != (size, size):
            raise ValueError(
                f"{path.name} takes {model_hw[0]}x{model_hw[1]} input, but the preprocessing "
                f"says input_size {size}; set --input-size or the face.json"
            )
        if normalises_inside(path) and (self.spec.mean, self.spec.std) != ((0.0,) * 3, (1.0,) * 3):
            logger.warning(
                "%s subtracts and scales its input inside the graph, yet the preprocessing also "
                "normalises (mean %s, std %s); check --mean/--std or the face.json",
                path.name,
                list(self.spec.mean),
                list(self.spec.std),
            )
        self.input_name = model_input.name
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        fixed = shape[0]
        # Some exports fix the batch dimension: feed full batches of that size, padded.
        self.fixed_batch = fixed if isinstance(fixed, int) and fixed > 0 else None
        self.batch_size = self.fixed_batch or batch_size

    def _resized(self, images: np.ndarray) -> np.ndarray:
        size = self.spec.input_size
        if images.shape[1:3] == (size, size):
            return images
        return np.stack(
            [
                np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
                for image in images
            ]
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from digi2real.face.embed import preprocess

        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = self._resized(images[start : start + self.batch_size])
            count = len(chunk)
            if self.fixed_batch and count < self.fixed_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - count, 0)])
            blob = preprocess(chunk, self.spec).astype(self.input_dtype, copy=False)
            outputs.append(self.session.run(None, {self.input_name: blob})[0][:count])
        return np.concatenate(outputs).astype(np.float32)


def read_recognizer_spec(path: str | Path) -> RecognizerSpec:
    """The ``recognizer`` section of a ``face.json`` (the file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FACE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"face config not found: {path}")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("recognizer"), dict):
        raise ValueError(f"{path} has no 'recognizer' section")
    try:
        return RecognizerSpec.from_dict(data["recognizer"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def is_onnx(model: object) -> TypeGuard[str | Path]:
    """Whether ``model`` names an ONNX file (the models a :class:`RecognizerSpec` applies to)."""
    return isinstance(model, str | Path) and Path(model).suffix == ".onnx"


def recognizer_spec(
    model: str | Path,
    face_config: str | Path | None = None,
    *,
    color: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
) -> tuple[RecognizerSpec, str]:
    """The preprocessing of the ONNX recognizer ``model`` and where it came from.

    ``face_config`` (a ``face.json`` or its folder), else the ``face.json`` next to the
    model when there is one, else ArcFace's; ``color``/``mean``/``std``/``input_size``
    that are not None override it.
    """
    if not is_onnx(model):
        raise ValueError(
            f"preprocessing (face.json, color, mean, std, input size) applies to .onnx models; "
            f"{model} is a trained checkpoint, evaluated with its training preprocessing"
        )
    beside = Path(model).parent / FACE_CONFIG
    if face_config is not None:
        spec, source = read_recognizer_spec(face_config), f"face.json {face_config}"
    elif beside.is_file():
        spec, source = read_recognizer_spec(beside), f"face.json {beside}"
    else:
        spec, source = RecognizerSpec(), ARCFACE_SOURCE
    given = {"color": color, "mean": mean, "std": std, "input_size": input_size}
    overrides = {key: value for key, value in given.items() if value is not None}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
        source += " + flags " + ", ".join(f"--{key.replace('_', '-')}" for key in overrides)
    return spec, source


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
        return _safetensors_backbone(path)
    return checkpoint_backbone(load_checkpoint(path), path)


def _safetensors_backbone(path: Path) -> nn.Module:
    """A ``backbone.safetensors`` written by training; a corrupt or foreign one is one
    ValueError naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {brief(error)}") from None
    name, size, fc = (
        metadata.get("backbone"),
        metadata.get("embedding_size"),
        weights.get("fc.weight"),
    )
    # the size read from the weights, not the metadata: a tampered number allocates nothing
    if name not in BACKBONES or fc is None or fc.ndim != 2 or size != str(fc.shape[0]):
        raise ValueError(
            f"{path}: its backbone/embedding_size metadata ({name!r:.40}, {size!r:.40}) do "
            "not describe its weights"
        )
    try:
        module = get_backbone(name, fc.shape[0])
        module.load_state_dict(weights)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: its weights do not fit a {name}: {brief(error)}") from None
    return module


def load_embedder(
    model: str | Path | Embedder,
    device: str = "cpu",
    batch_size: int = 64,
    spec: RecognizerSpec | None = None,
) -> Embedder:
    """An embedder from a callable, an ``.onnx`` file (fed as ``spec`` says, default
    ArcFace's), or a training output (dir/file)."""
    if spec is not None and not is_onnx(model):
        raise ValueError(f"a recognizer spec applies to .onnx models only, not {model!r}")
    if callable(model):
        return model
    path = Path(model)
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, device, batch_size, spec)
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
    spec: RecognizerSpec | None = None,
    spec_source: str | None = None,
) -> VerificationReport:
    """Evaluate ``model`` on ``bins/<name>.bin`` for each name; write ``out`` (.md) + .json.

    For an ``.onnx`` model, ``spec`` is its preprocessing (None: :func:`recognizer_spec`'s
    choice: the ``face.json`` next to it, else ArcFace's); ``spec_source`` says where it
    came from in the report. Other models refuse a ``spec``.
    """
    bins = Path(bins)
    paths = [bins / f"{name}.bin" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        present = sorted(p.stem for p in bins.glob("*.bin")) if bins.is_dir() else []
        raise FileNotFoundError(f"verification sets not found: {missing}; present: {present}")
    preprocessing: dict[str, Any] | None = None
    if is_onnx(model):
        if spec is None:
            spec, spec_source = recognizer_spec(model)
        preprocessing = spec_record(spec, spec_source or "given")
    elif not callable(model):
        preprocessing = copy.deepcopy(TRAINING_PREPROCESSING)
    embedder = load_embedder(model, device, batch_size, spec)  # a model refused logs nothing
    if is_onnx(model) and preprocessing is not None:
        logger.info("%s preprocessing: %s", model, describe_preprocessing(preprocessing))
    label = model_name or (str(model) if not callable(model) else type(model).__name__)
    report = VerificationReport(model=label, preprocessing=preprocessing)
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
