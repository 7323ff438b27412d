"""Images to ArcFace embeddings: the one path (load -> detect/align -> embed) every caller
uses: the shard's source renders, ``Digi2Real.augment``, ``digi2real embed``, domain-shift
statistics and the report's gallery."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digi2real.data.embeddings import EmbeddingSet, save_embeddings
from digi2real.data.images import ImageError, load_image
from digi2real.data.labelled import labelled_layout_of, scan_source
from digi2real.data.readers import IdentitySelection, image_files
from digi2real.face.stack import FaceStack

logger = logging.getLogger(__name__)

# crops embedded per call; a multiple of the recognizer's own batch (64), so rows are
# computed in the same groups however the inputs are streamed
EMBED_BATCH = 256

ImageInput = str | Path | np.ndarray


@dataclass
class ImageEmbedding:
    """One input's outcome: its unit embedding, or the stage (``read``/``detect``) and the
    reason it is unusable."""

    name: str
    embedding: np.ndarray | None
    stage: str = ""
    reason: str = ""


def _load(name: str, item: ImageInput) -> np.ndarray:
    if isinstance(item, str | Path):
        return load_image(item)
    image = np.asarray(item)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}"
        )
    return image


def embed_images(
    faces: FaceStack, items: Iterable[tuple[str, ImageInput]], *, batch_size: int = EMBED_BATCH
) -> Iterator[ImageEmbedding]:
    """Every ``(name, path or RGB array)`` item's outcome, in input order; aligned crops are
    embedded ``batch_size`` at a time, so memory stays flat in the number of images. An array
    that is not an HxWx3 uint8 image is a ValueError (a caller's bug, not a bad file)."""
    pending: list[ImageEmbedding] = []
    crops: list[np.ndarray] = []

    def flush() -> Iterator[ImageEmbedding]:
        if crops:
            for outcome, embedding in zip(
                (p for p in pending if p.stage == ""), faces.embed(np.stack(crops)), strict=True
            ):
                outcome.embedding = embedding
        yield from pending
        pending.clear()
        crops.clear()

    for name, item in items:
        try:
            image = _load(name, item)
        except ImageError as error:
            detail = f": {error.detail}" if error.detail else ""
            pending.append(ImageEmbedding(name, None, "read", error.reason + detail))
            continue
        crop, why = faces.align(image)
        if crop is None:
            pending.append(ImageEmbedding(name, None, "detect", why))
            continue
        pending.append(ImageEmbedding(name, None))
        crops.append(crop)
        if len(crops) == batch_size:
            yield from flush()
    yield from flush()


def embed_files(faces: FaceStack, files: Iterable[Path], root: Path) -> Iterator[ImageEmbedding]:
    """:func:`embed_images` of image files, named by their path relative to ``root``."""
    return embed_images(faces, ((os.path.relpath(path, root), path) for path in files))


def _collect(
    outcomes: Iterable[ImageEmbedding], identity_of: dict[str, str] | None
) -> tuple[list[np.ndarray], list[str], list[str], int]:
    embeddings, identities, paths, errors = [], [], [], 0
    for outcome in outcomes:
        if outcome.embedding is None:
            logger.warning("skipped %s: %s", outcome.name, outcome.reason)
            errors += 1
            continue
        embeddings.append(outcome.embedding)
        paths.append(outcome.name)
        identities.append(identity_of[outcome.name] if identity_of else outcome.name)
    return embeddings, identities, paths, errors


def embed_dataset(
    faces: FaceStack,
    root: str | Path,
    *,
    select: IdentitySelection | str | None = None,
    flat: bool = False,
) -> tuple[EmbeddingSet, int]:
    """Every usable image of an identity dataset (one folder per identity) and how many
    inputs were unusable. ``flat``: a folder with no identity folders is read as one identity
    per image (a gallery of single photos)."""
    root = Path(root)
    layout = labelled_layout_of(root) or "folders"
    sources, scan_errors = scan_source(root, layout, select=select)
    if sources:
        identity_of = {
            os.path.relpath(path, root): source.name for source in sources for path in source.files
        }
        files = [path for source in sources for path in source.files]
        collected = _collect(embed_files(faces, files, root), identity_of)
    elif flat:
        collected = _collect(embed_files(faces, image_files(root), root), None)
    else:
        collected = ([], [], [], 0)
    embeddings, identities, paths, errors = collected
    if not identities:
        raise ValueError(f"no usable face images in {root}")
    return EmbeddingSet(np.stack(embeddings), identities, paths), errors + len(scan_errors)


def embedding_batches(
    faces: FaceStack, folder: Path, *, batch_size: int = 64
) -> Iterator[np.ndarray]:
    """Unit embeddings of every usable image under ``folder`` (any depth), in batches (the
    batches are what domain-shift statistics are accumulated over)."""
    return usable_batches(embed_files(faces, source_images(folder), folder), batch_size=batch_size)


def source_images(folder: Path) -> list[Path]:
    """The images of ``folder``: a labelled layout's renders (never its masks), else every
    image file under it."""
    layout = labelled_layout_of(folder)
    if layout is None:
        return image_files(folder)
    sources, _ = scan_source(folder, layout)
    return [path for source in sources for path in source.files]


def usable_batches(
    outcomes: Iterable[ImageEmbedding], *, batch_size: int = 64
) -> Iterator[np.ndarray]:
    """The embeddings of the usable ``outcomes`` in (batch_size, D) batches (the last may be
    shorter); unusable inputs are logged and skipped."""
    batch: list[np.ndarray] = []
    for outcome in outcomes:
        if outcome.embedding is None:
            logger.warning("skipped %s: %s", outcome.name, outcome.reason)
            continue
        batch.append(outcome.embedding)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def embed_to_file(
    faces: FaceStack, src: str | Path, out: str | Path, *, select: IdentitySelection | str | None
) -> tuple[int, int]:
    """``digi2real embed``: every usable image of an identity dataset to ``out`` (``.npy`` and
    its rows file); returns (embedded, unusable)."""
    embedded, errors = embed_dataset(faces, src, select=select)
    save_embeddings(out, embedded.embeddings, identities=embedded.identities, paths=embedded.paths)
    return len(embedded.embeddings), errors
