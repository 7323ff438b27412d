"""Training data for the recogniser: a converted ``OUT/`` as ImageFolder, its RecordIO, or its
WebDataset shards (the format to train from when OUT is an object-store URL: the tars are
fetched whole, once per node, into the node's cache and read from there).

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

from digi2real.data.images import open_image
from digi2real.data.layout import (
    IMAGES,
    LABELS,
    RECORDIO,
    RECORDIO_PROPERTY,
    WEBDATASET,
    OutLayout,
)
from digi2real.data.store import ObjectPath
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
    """PIL image, encoded bytes or HWC uint8 array -> HWC uint8 RGB, checked 112x112.

    Encoded bytes are read as untrusted (``open_image``: allowed formats only, Pillow's
    decompression-bomb warning an error); an image's size is checked before its pixels are
    decoded."""
    if isinstance(image, bytes | bytearray | memoryview):
        image = open_image(io.BytesIO(bytes(image)), path=source)
    if isinstance(image, Image.Image):
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"{source}: expected aligned {IMAGE_SIZE}x{IMAGE_SIZE} images, got "
                f"{(image.height, image.width)}"
            )
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
        with open_image(path) as image:
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


class WebDatasetFaces(_FlipMixin, Dataset):
    """``OUT/wds/shard-*.tar`` (a local folder or a store's URL) as a map-style dataset.

    Each tar is read whole once (from the node's cache when OUT is on a store) and indexed by
    member offset; samples are ``<key>.jpg`` with ``<key>.cls`` labels, sorted by (label,
    key), which is ImageFolderFaces' (label, path) order for the same output.
    """

    def __init__(self, root: str | Path, seed: int = 0, flip: bool = True) -> None:
        import tarfile

        from digi2real.data.node_cache import local_files

        self.root = OutLayout(root).root
        tars = sorted((self.root / WEBDATASET).glob("shard-*.tar"))
        if not tars:
            raise FileNotFoundError(f"no {WEBDATASET}/shard-*.tar under {self.root}")
        self.files = local_files(tars, folder="wds")
        found: dict[str, dict[str, Any]] = {}
        for number, path in enumerate(self.files):
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    key, _, suffix = member.name.partition(".")
                    entry = found.setdefault(key, {})
                    if suffix == "jpg":
                        entry["jpg"] = (number, member.offset_data, member.size)
                    elif suffix == "cls":
                        handle = tar.extractfile(member)
                        entry["label"] = int(handle.read()) if handle is not None else -1
        self.samples = sorted(
            ((v["label"], key, v["jpg"]) for key, v in found.items() if "jpg" in v),
            key=lambda item: (item[0], item[1]),
        )
        if not self.samples:
            raise ValueError(f"no training images in the tars under {self.root}")
        self.num_classes = max(label for label, _, _ in self.samples) + 1
        self.seed, self.epoch, self.flip = seed, 0, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, key, (number, offset, size) = self.samples[index]
        with open(self.files[number], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        return self._transform(_decode(data, f"{self.root}/{key}.jpg"), index), label


def open_dataset(
    root: str | Path, data_format: str = "auto", seed: int = 0, flip: bool = True
) -> ImageFolderFaces | RecordFaces | WebDatasetFaces:
    """The training set of a converted ``OUT/`` (a path, or a URL for ``webdataset``) in
    ``data_format`` (one of DATA_FORMATS)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; valid choices: {DATA_FORMATS}")
    out = OutLayout(root)
    remote = isinstance(out.root, ObjectPath)
    if not out.root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {out.root}")
    if data_format == "auto":
        if remote or not (out.images.is_dir() or (out / RECORDIO).is_dir()):
            data_format = "webdataset"
        else:
            data_format = "imagefolder" if out.images.is_dir() else "rec"
    if data_format == "webdataset":
        return WebDatasetFaces(out.root, seed=seed, flip=flip)
    if remote:
        raise ValueError(
            f"{out.root} is on an object store: train from its WebDataset shards "
            "(--format webdataset), read whole, not from one object per image"
        )
    if data_format == "imagefolder":
        return ImageFolderFaces(out.root, seed=seed, flip=flip)
    return RecordFaces(out / RECORDIO, seed=seed, flip=flip)
