"""Random-weight ONNX stand-ins for ArcFace and SCRFD (the tiny weights profile), and for
buffalo_l's optional 3D landmark (``1k3d68.onnx``) and gender/age (``genderage.onnx``) models.

ArcFace and SCRFD are exported with torch's dynamo-based ONNX exporter (the default since
torch 2.9; the TorchScript exporter is deprecated), weights embedded in the file, from modules
initialised by a seeded generator so that the same seed gives the same bytes. The two attribute
models are a pooling and a projection each, written directly with onnx's graph helpers (an
export would cost seconds; these take milliseconds), weights from a seeded numpy generator.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from digi2real.data import fsio
from digi2real.weights.face_config import DetectorSpec, RecognizerSpec

logger = logging.getLogger(__name__)

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
TINY_DETECTOR_SCORE_BIAS = -30.0  # sigmoid(-30) ~ 1e-13: no anchor ever passes a threshold


def _seeded(build: Callable[[], nn.Module], seed: int, std: float) -> nn.Module:
    """Build a module whose weights depend on ``seed`` alone.

    Construction runs inside ``fork_rng`` because torch's default initialisers draw from
    the global generator, which is the caller's; all weights are then redrawn from a
    private generator in module order.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        module = build()
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                layer.weight.normal_(0.0, std, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module


# Pixels are averaged over POOL x POOL cells before the projection: the file stays small
# (3 * 28 * 28 * dim weights at 112x112) and the blotches that tell the tiny profile's images
# apart are larger than the cells.
TINY_RECOGNIZER_POOL = 4


class _TinyRecognizer(nn.Module):
    """A fixed seeded random projection of pooled pixels, each channel centred on its image
    mean, L2-normalised.

    Random weights in a conv net map every image to nearly one vector (all cosines ~1), so a
    tiny-profile report called every identity a collision. A random linear projection keeps
    inner products in expectation (Johnson-Lindenstrauss): cosines of embeddings follow the
    cosines of the centred pixels, up to noise of order 1/sqrt(dim). The centring drops each
    image's overall colour, which the random generator's outputs share (their raw pixel
    centroids reach cosine 0.5 between identities; centred, 0.2).
    """

    def __init__(self, dim: int, input_size: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(TINY_RECOGNIZER_POOL)
        cells = input_size // TINY_RECOGNIZER_POOL
        self.projection = nn.Linear(3 * cells * cells, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x)
        centred = pooled - pooled.mean(dim=(2, 3), keepdim=True)
        embedding = self.projection(torch.flatten(centred, 1))
        return embedding / torch.linalg.vector_norm(embedding, dim=1, keepdim=True)


class _TinySCRFD(nn.Module):
    """Three strides, two anchors, score/bbox/kps heads in SCRFD's non-batched layout."""

    def __init__(self) -> None:
        super().__init__()
        channels = 8
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
            for _ in SCRFD_STRIDES
        )
        self.score = nn.ModuleList(nn.Conv2d(channels, SCRFD_ANCHORS, 1) for _ in SCRFD_STRIDES)
        self.bbox = nn.ModuleList(nn.Conv2d(channels, SCRFD_ANCHORS * 4, 1) for _ in SCRFD_STRIDES)
        self.kps = nn.ModuleList(nn.Conv2d(channels, SCRFD_ANCHORS * 10, 1) for _ in SCRFD_STRIDES)

    @staticmethod
    def _flat(x: torch.Tensor, width: int) -> torch.Tensor:
        # (1, A*C, H, W) -> (H*W*A, C): anchors vary fastest, as SCRFD's anchor centres do.
        return x.permute(0, 2, 3, 1).reshape(-1, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature = self.stem(x)
        scores, bboxes, kpss = [], [], []
        for level, score, bbox, kps in zip(
            self.levels, self.score, self.bbox, self.kps, strict=True
        ):
            feature = level(feature)
            scores.append(self._flat(torch.sigmoid(score(feature)), 1))
            bboxes.append(self._flat(torch.relu(bbox(feature)), 4))
            kpss.append(self._flat(kps(feature), 10))
        return (*scores, *bboxes, *kpss)


def _export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, object]] | None,
) -> None:
    module.eval()
    # The exporter prints progress to stdout and logs/warns about its own internals
    # (e.g. torchvision ops it skips); none of it concerns our model.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    model = program.model_proto
    # Exporter metadata (FX node dumps, symbolic range constraints printed from an
    # unordered dict) is debug information and varies between runs; drop it so one seed
    # gives one file.
    del model.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.checker.check_model(model)
    fsio.atomic_write_bytes(path, model.SerializeToString())
    logger.debug("exported %s (%d bytes)", path, path.stat().st_size)


def export_tiny_recognizer(
    path: str | Path, *, dim: int = 64, input_size: int = 112, seed: int = 0
) -> Path:
    """A seeded random projection of pooled pixels: ``N x 3 x S x S`` (dynamic N) ->
    ``N x dim``, L2-normalised (see :class:`_TinyRecognizer`)."""
    if dim < 1 or input_size < 2 * TINY_RECOGNIZER_POOL:
        raise ValueError(
            f"need dim >= 1 and input_size >= {2 * TINY_RECOGNIZER_POOL}, got dim={dim}, "
            f"input_size={input_size}"
        )
    module = _seeded(lambda: _TinyRecognizer(dim, input_size), seed, std=1.0)
    with torch.no_grad():
        # A flat image centres to zero: a small seeded bias gives it a direction (next to a
        # patterned image's embedding, of norm ~100, it is noise).
        bias = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        module.projection.bias.copy_(1e-3 * bias / torch.linalg.vector_norm(bias))
    example = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(path)
    _export(module, example, out, ["embedding"], {"x": {0: batch}})
    return out


def export_tiny_detector(path: str | Path, *, input_size: int = 160, seed: int = 0) -> Path:
    """A random SCRFD-shaped detector (9 outputs, strides 8/16/32, 2 anchors) that finds nothing.

    The input is fixed at ``1 x 3 x input_size x input_size`` (insightface's SCRFD reads a
    fixed size from the model, as with the 640x640 exports of SCRFD); a fixed shape also
    exports several times faster than symbolic height and width.
    """
    if input_size < 32 or input_size % 32:
        raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
    module = _seeded(_TinySCRFD, seed, std=0.05)
    with torch.no_grad():
        for head in module.score:
            head.bias.fill_(TINY_DETECTOR_SCORE_BIAS)
    example = torch.zeros(1, 3, input_size, input_size)
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in SCRFD_STRIDES]
    out = Path(path)
    _export(module, example, out, names, None)
    return out


def tiny_face_specs(*, detector_input_size: int = 160) -> tuple[RecognizerSpec, DetectorSpec]:
    """The ``face.json`` contents matching the tiny models (same file names as the real ones)."""
    recognizer = RecognizerSpec()
    detector = DetectorSpec(input_size=detector_input_size, fallback="center_crop")
    return recognizer, detector


# -- buffalo_l's optional attribute models: 1k3d68.onnx and genderage.onnx -------------------
#
# insightface's ``Landmark`` and ``Attribute`` read everything from the model: the input size
# from its (N, 3, S, S) input, the task from its one output's width (3309 = 1103 points x 3,
# of which the last 68 are the iBUG-68 landmarks in 3D; 3 = two gender logits and age / 100)
# and the input normalisation from the first nodes' names (no Sub/Mul among them: the class
# feeds (x - 127.5) / 128). These two are written with onnx's graph helpers, not exported from
# torch: a handful of nodes each, built in milliseconds, so the tiny profile always has them.

LANDMARK_3D_INPUT = 192
LANDMARK_3D_OUTPUT = 3309  # 1103 points x 3; insightface keeps the last 68
LANDMARK_3D_POINTS = 68
GENDERAGE_INPUT = 96
ATTRIBUTE_POOL_CELLS = 4  # the image is averaged down to 4 x 4 cells before the projection
TINY_LANDMARK_3D_STD = 0.05  # how far (normalised crop units) pooled pixels move the points
TINY_GENDERAGE_STD = 0.5
_ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # (onnx 1.10): old onnxruntime releases read it too


def _pooled_projection(
    input_size: int, weight: np.ndarray, bias: np.ndarray
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes ``data`` -> ``projected`` (N, out): average over 4 x 4 cells, flatten, Gemm."""
    cell = input_size // ATTRIBUTE_POOL_CELLS
    nodes = [
        helper.make_node(
            "AveragePool",
            ["data"],
            ["pooled"],
            name="pool",
            kernel_shape=[cell, cell],
            strides=[cell, cell],
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node(
            "Gemm", ["flat", "weight", "bias"], ["projected"], name="projection", transB=1
        ),
    ]
    initializers = [
        numpy_helper.from_array(weight.astype(np.float32), "weight"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
    ]
    return nodes, initializers


def _write_graph(
    path: Path,
    name: str,
    input_size: int,
    output_width: int,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
) -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(
                "data", TensorProto.FLOAT, ["batch", 3, input_size, input_size]
            )
        ],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", output_width])],
        initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="digi2real-tiny",
        opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
        ir_version=_ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    fsio.atomic_write_bytes(path, model.SerializeToString())
    logger.debug("wrote %s (%d bytes)", path, path.stat().st_size)
    return path


def _insightface_mean_shape() -> np.ndarray:
    from insightface.data import get_object

    shape = get_object("meanshape_68.pkl")
    if shape is None or tuple(shape.shape) != (LANDMARK_3D_POINTS, 3):
        raise RuntimeError("insightface's meanshape_68.pkl is missing or not (68, 3)")
    return np.asarray(shape, np.float32)


def export_tiny_landmark_3d(
    path: str | Path,
    *,
    seed: int = 0,
    points: np.ndarray | None = None,
    std: float = TINY_LANDMARK_3D_STD,
) -> Path:
    """A stand-in for buffalo_l's ``1k3d68.onnx``: ``N x 3 x 192 x 192`` (dynamic N) ->
    ``N x 3309``. Its 68 points are ``points`` ((68, 3) in the model's normalised crop
    coordinates, -1 to 1 across the 192-pixel crop; default insightface's mean shape,
    ``meanshape_68.pkl``, the shape the pose is fitted to) moved by a seeded random projection
    of pooled pixels (``std`` 0: not at all, a constant output): the pose is near frontal and
    follows the image. The 1035 leading points, which insightface drops, are zeros."""
    base = _insightface_mean_shape() if points is None else np.asarray(points, np.float32)
    if base.shape != (LANDMARK_3D_POINTS, 3) or not np.isfinite(base).all():
        raise ValueError(f"points must be a finite (68, 3) array, got shape {base.shape}")
    rng = np.random.default_rng(seed)
    cells = 3 * ATTRIBUTE_POOL_CELLS * ATTRIBUTE_POOL_CELLS
    weight = rng.normal(0.0, 1.0, (LANDMARK_3D_POINTS * 3, cells)) * std
    nodes, initializers = _pooled_projection(LANDMARK_3D_INPUT, weight, base.reshape(-1))
    lead = LANDMARK_3D_OUTPUT - LANDMARK_3D_POINTS * 3
    nodes.append(helper.make_node("Pad", ["projected", "pads"], ["fc1"], name="pad"))
    initializers.append(numpy_helper.from_array(np.array([0, lead, 0, 0], np.int64), "pads"))
    return _write_graph(
        Path(path), "tiny_1k3d68", LANDMARK_3D_INPUT, LANDMARK_3D_OUTPUT, nodes, initializers
    )


def export_tiny_genderage(path: str | Path, *, seed: int = 0) -> Path:
    """A stand-in for buffalo_l's ``genderage.onnx``: ``N x 3 x 96 x 96`` (dynamic N) ->
    ``N x 3``: two gender logits (female, male) and age / 100 (a sigmoid: 0 to 100 years),
    a seeded random projection of pooled pixels."""
    rng = np.random.default_rng(seed)
    cells = 3 * ATTRIBUTE_POOL_CELLS * ATTRIBUTE_POOL_CELLS
    weight = rng.normal(0.0, TINY_GENDERAGE_STD, (3, cells))
    nodes, initializers = _pooled_projection(GENDERAGE_INPUT, weight, np.zeros(3))
    nodes += [
        helper.make_node("Slice", ["projected", "zero", "two", "one"], ["logits"], name="gender"),
        helper.make_node("Slice", ["projected", "two", "three", "one"], ["age_logit"], name="age"),
        helper.make_node("Sigmoid", ["age_logit"], ["age"], name="age_sigmoid"),
        helper.make_node("Concat", ["logits", "age"], ["fc1"], name="concat", axis=1),
    ]
    initializers += [
        numpy_helper.from_array(np.array([value], np.int64), name)
        for name, value in (("zero", 0), ("one", 1), ("two", 2), ("three", 3))
    ]
    return _write_graph(Path(path), "tiny_genderage", GENDERAGE_INPUT, 3, nodes, initializers)
