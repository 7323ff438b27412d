"""Models the report embeds with: a gallery of real faces (the weights' recognizer), the
judge (a stricter recognizer than the generation's) whose embeddings of the outputs replace the
run's own in every identity-level figure (``OUT/report/judge_outputs.npy``), and an image
encoder (``--features``: DINOv2, CLIP...) in whose space the domain gap is measured too. The
judge and the encoder are one kind of thing, :class:`OnnxImages`: an ONNX model with its
preprocessing, fed aligned 112x112 crops resized to its input size."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digi2real.analysis.report.dataset import Dataset, GalleryEmbedder
from digi2real.config import Config
from digi2real.data import fsio
from digi2real.data.embeddings import EmbeddingSet

if TYPE_CHECKING:
    from digi2real.face import FaceStack, RecognizerSpec

logger = logging.getLogger(__name__)

Judge = Callable[[Sequence[Path]], np.ndarray]


def gallery_embedder(config: Config) -> GalleryEmbedder:
    """Embeds a folder of real faces with the weights' recognizer: identity folders, or one
    identity per image in a flat folder."""

    def embed(folder: Path) -> EmbeddingSet:
        from digi2real.face.images import embed_dataset
        from digi2real.face.stack import FaceStack

        embedded, _errors = embed_dataset(FaceStack.from_config(config), folder, flat=True)
        return embedded

    return embed


def _device(config: Config | None) -> str:
    if config is None or config.run.device == "auto":
        return "cpu"
    return config.run.device


class OnnxImages:
    """An ONNX image model ``(N, 3, S, S) -> (N, D)`` with its preprocessing: aligned 112x112
    crops (or files of them) in, resized to ``spec.input_size`` (bicubic), embedded."""

    def __init__(
        self, spec: RecognizerSpec, path: Path, *, device: str = "cpu", normalize: bool = True
    ) -> None:
        from digi2real.face import FaceEmbedder

        self.spec = spec
        self.path = Path(path)
        self.embedder = FaceEmbedder(spec, self.path, device=device, normalize=normalize)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        size = self.spec.input_size
        if crops.shape[1:3] != (size, size):
            from PIL import Image

            crops = np.stack(
                [np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in crops]
            )
        return self.embedder.embed(crops)

    def __call__(self, paths: Sequence[Path]) -> np.ndarray:
        from digi2real.data.images import load_image

        return self.embed_crops(np.stack([load_image(path) for path in paths]))


def judge_embedder(config: Config) -> Judge | None:
    """The report's stricter recognizer (``report.recognizer`` in the config), or None."""
    from digi2real.face import RecognizerSpec

    section = config.report
    if section.recognizer is None:
        return None
    path = Path(section.recognizer)
    spec = RecognizerSpec(
        file=path.name,
        input_size=section.input_size,
        color=section.color,
        mean=tuple(section.mean),
        std=tuple(section.std),
    )
    return OnnxImages(spec, path, device=_device(config))


# DINOv2's preprocessing (Stein et al. 2023 measure FD in its space): 224x224 RGB, ImageNet
# mean and std on 0-255 pixels; CLIP's or another encoder's are given by flags.
FEATURES_INPUT_SIZE = 224
FEATURES_MEAN = (123.675, 116.28, 103.53)
FEATURES_STD = (58.395, 57.12, 57.375)


def features_embedder(
    path: Path,
    *,
    input_size: int | None = None,
    color: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    config: Config | None = None,
) -> OnnxImages:
    """The ``--features`` encoder: DINOv2's preprocessing unless a flag says otherwise; its
    outputs are kept as they come (not L2-normalised), as Fréchet distances in DINOv2 space
    are usually measured."""
    from digi2real.face import RecognizerSpec

    spec = RecognizerSpec(
        file=Path(path).name,
        input_size=input_size or FEATURES_INPUT_SIZE,
        color=color or "RGB",
        mean=tuple(mean or FEATURES_MEAN),  # type: ignore[arg-type]
        std=tuple(std or FEATURES_STD),  # type: ignore[arg-type]
    )
    return OnnxImages(spec, Path(path), device=_device(config), normalize=False)


class _AlignThen:
    """What :func:`digi2real.face.images.embed_images` needs, ``align`` and ``embed``: the
    weights' detector and aligner, then another model (an encoder's space)."""

    def __init__(self, faces: FaceStack, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        self.align = faces.align
        self.embed = embed


def embedded_blocks(
    faces: FaceStack,
    paths: Iterable[Path],
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    block: int = 1024,
) -> Iterator[np.ndarray]:
    """Images aligned by ``faces`` and embedded by ``embed`` (default: ``faces``' recognizer),
    in blocks of ``block`` rows; unusable images are logged and skipped."""
    from digi2real.face.images import embed_images, usable_batches

    model = faces if embed is None else _AlignThen(faces, embed)
    items = ((str(path), path) for path in paths)
    return usable_batches(embed_images(model, items), batch_size=block)  # type: ignore[arg-type]


def write_judge_outputs(dataset: Dataset, judge: Judge, path: Path, block: int) -> np.ndarray:
    """Embed every accepted image with the judge, in blocks, into the ``.npy`` at ``path``
    (streamed: the array is never whole in memory); return it memory-mapped."""
    total = len(dataset.paths)
    logger.info("embedding %d images with the judge into %s", total, path)
    # the width is the judge's: the header is written once the first block is embedded
    with fsio.atomic_open(path) as handle:
        width: int | None = None
        for start in range(0, total, block):
            paths = [dataset.out_dir / p for p in dataset.paths[start : start + block]]
            embeddings = np.asarray(judge(paths), dtype=np.float32)
            if width is None:
                width = int(embeddings.shape[1])
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False,
                    "shape": (total, width),
                }
                np.lib.format.write_array_header_1_0(handle, header)
            if embeddings.shape != (len(paths), width):
                raise ValueError(
                    f"judge returned {embeddings.shape} embeddings for {len(paths)} images "
                    f"(expected ({len(paths)}, {width}))"
                )
            handle.write(np.ascontiguousarray(embeddings).tobytes())
        assert width is not None  # open_dataset refuses an empty manifest
    return np.load(path, mmap_mode="r")
