"""Training data for the recogniser: a converted ``OUT/`` as ImageFolder, or its RecordIO.

Images are 112x112 aligned RGB; the transform is ArcFace training's: a random horizontal
flip, then ``(pixel - 127.5) / 127.5`` in CHW float32. The flip of sample ``i`` in epoch
``e`` is drawn from a generator seeded by ``(seed, e, i)``, so the batches do not depend on
the number of loader workers or on where a resumed run restarts.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from digi2real.data.layout import IMAGES, LABELS, RECORDIO, RECORDIO_PROPERTY, OutLayout
from digi2real.evaluate.choices import DATA_FORMATS

logger = logging.getLogger(__name__)

IMAGE_SIZE = 112
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [-1, 1], as ArcFace training normalises."""
    chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return (chw.float() - 127.5) / 127.5


def hflip(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, ::-1, :]


def draw_flip(seed: int, epoch: int, index: int) -> bool:
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


def read_labels(path: Path) -> dict[str, int]:
    """``labels.csv`` (header ``label,identity``) -> {identity: label}, checked contiguous."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"label", "identity"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a 'label,identity' header, got {reader.fieldnames}")
        labels = {row["identity"]: int(row["label"]) for row in reader}
    if sorted(labels.values()) != list(range(len(labels))):
        raise ValueError(f"{path}: labels must be the contiguous integers 0..{len(labels) - 1}")
    return labels


def _decode(image: Any, source: str) -> np.ndarray:
    """PIL image, encoded bytes or HWC uint8 array -> HWC uint8 RGB, checked 112x112."""
    if isinstance(image, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"{source}: expected RGB uint8, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{source}: expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} images, got {pixels.shape[:2]}"
        )
    return pixels


class _FlipMixin:
    seed: int
    epoch: int
    flip: bool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _transform(self, pixels: np.ndarray, index: int) -> torch.Tensor:
        if self.flip and draw_flip(self.seed, self.epoch, index):
            pixels = hflip(pixels)
        return to_tensor(pixels)


class ImageFolderFaces(_FlipMixin, Dataset):
    """``OUT/images/<identity>/*.jpg`` with labels from ``OUT/labels.csv``.

    The file list comes from ``manifest.parquet`` when present (accepted images only) and
    from the folder otherwise; either way it is sorted by (label, path).
    """

    def __init__(self, root: str | Path, seed: int = 0, flip: bool = True) -> None:
        self.root = Path(root)
        self.layout = OutLayout(self.root)
        images_dir = self.layout.images
        if not images_dir.is_dir():
            raise FileNotFoundError(f"no {IMAGES}/ folder under {self.root}")
        labels_csv = self.layout.labels
        if labels_csv.is_file():
            labels = read_labels(labels_csv)
        else:
            identities = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
            labels = {name: label for label, name in enumerate(identities)}
            logger.warning("%s missing: labels from sorted identity folders", labels_csv)
        self.samples = self._list(labels)
        if not self.samples:
            raise ValueError(f"no training images found under {images_dir}")
        self.num_classes = len(labels)
        self.identities = sorted(labels, key=labels.__getitem__)
        self.seed, self.epoch, self.flip = seed, 0, flip

    def _list(self, labels: dict[str, int]) -> list[tuple[str, int]]:
        manifest = self.layout.manifest
        if manifest.is_file():
            import pyarrow.parquet as pq

            table = pq.read_table(manifest, columns=["identity", "label", "path"]).to_pydict()
            samples = []
            for identity, label, rel in zip(
                table["identity"], table["label"], table["path"], strict=True
            ):
                if labels.get(identity) != label:
                    raise ValueError(
                        f"{manifest}: {identity!r} has label {label}, {LABELS} says "
                        f"{labels.get(identity)}"
                    )
                samples.append((rel, int(label)))
        else:
            samples = [
                (path.relative_to(self.root).as_posix(), label)
                for identity, label in labels.items()
                for path in (self.layout.images / identity).iterdir()
                if path.suffix.lower() in IMAGE_SUFFIXES
            ]
        return sorted(samples, key=lambda item: (item[1], item[0]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[index]
        path = self.root / rel
        with Image.open(path) as image:
            pixels = _decode(image, str(path))
        return self._transform(pixels, index), label


class RecordFaces(_FlipMixin, Dataset):
    """``OUT/rec/`` (insightface ``train.rec``) through ``digi2real.data.writers.recordio``."""

    def __init__(self, rec_dir: str | Path, seed: int = 0, flip: bool = True) -> None:
        try:
            from digi2real.data.writers.recordio import RecordIODataset
        except ImportError as error:
            raise ValueError(
                "data_format 'rec' needs digi2real.data.writers.recordio.RecordIODataset, which is not "
                f"importable here ({error}); use data_format 'imagefolder'"
            ) from error
        self.rec_dir = Path(rec_dir)
        self.records: Sequence[Any] = RecordIODataset(self.rec_dir)
        self.num_classes = self._num_classes()
        self.seed, self.epoch, self.flip = seed, 0, flip

    def _num_classes(self) -> int:
        count = getattr(self.records, "num_classes", None)
        if count is None:
            # insightface's property file: "num_classes,height,width".
            prop = self.rec_dir / RECORDIO_PROPERTY
            if not prop.is_file():
                raise FileNotFoundError(f"cannot tell the number of classes: no {prop}")
            count = prop.read_text(encoding="utf-8").split(",")[0]
        return int(count)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.records[index][:2]
        label = int(np.asarray(label).reshape(-1)[0])
        return self._transform(_decode(image, f"{self.rec_dir}[{index}]"), index), label


def open_dataset(
    root: str | Path, data_format: str = "auto", seed: int = 0, flip: bool = True
) -> ImageFolderFaces | RecordFaces:
    """The training set of a converted ``OUT/`` in ``data_format`` (one of DATA_FORMATS)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; valid choices: {DATA_FORMATS}")
    out = OutLayout(root)
    if not out.root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {out.root}")
    if data_format == "auto":
        data_format = "imagefolder" if out.images.is_dir() else "rec"
    if data_format == "imagefolder":
        return ImageFolderFaces(out.root, seed=seed, flip=flip)
    return RecordFaces(out / RECORDIO, seed=seed, flip=flip)
