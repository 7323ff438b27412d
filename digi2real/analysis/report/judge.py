"""Recognizers the report embeds with: a gallery of real faces, and the judge (a stricter
recognizer than the generation's) whose embeddings of the outputs replace the run's own
in every identity-level figure (``OUT/report/judge_outputs.npy``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from digi2real.analysis.report.dataset import Dataset, GalleryEmbedder
from digi2real.config import Config
from digi2real.data import fsio
from digi2real.data.embeddings import EmbeddingSet

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


def judge_embedder(config: Config) -> Judge | None:
    """The report's stricter recognizer (``report.recognizer`` in the config), or None."""
    from digi2real.data.images import load_image
    from digi2real.face import FaceEmbedder, RecognizerSpec

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
    embedder = FaceEmbedder(
        spec, path, device=config.run.device if config.run.device != "auto" else "cpu"
    )

    def embed(paths: Sequence[Path]) -> np.ndarray:
        crops = []
        for image_path in paths:
            image = load_image(image_path)
            if image.shape[:2] != (section.input_size, section.input_size):
                from PIL import Image

                image = np.asarray(
                    Image.fromarray(image).resize((section.input_size,) * 2, Image.BICUBIC)
                )
            crops.append(image)
        return embedder.embed(np.stack(crops))

    return embed


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
