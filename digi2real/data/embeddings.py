"""Embedding arrays on disk: ``FILE.npy`` (N, D) float32 L2-normalised, rows beside.

The rows file ``FILE.rows.parquet`` (optional) holds, row-aligned, ``identity`` (str) and
``path`` (str) for each embedding. ``digi2real embed`` writes both; ``stats``,
``report --gallery`` and ``augment`` read them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.data import fsio
from digi2real.data.store import ObjectPath, location

logger = logging.getLogger(__name__)

ROWS_SUFFIX = ".rows.parquet"


@dataclass(frozen=True)
class EmbeddingSet:
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    identities: list[str] | None = None
    paths: list[str] | None = None


def rows_path(path: str | Path | ObjectPath) -> Any:
    path = location(path)
    return path.with_name(path.stem + ROWS_SUFFIX)


def check_embeddings(
    array: np.ndarray, *, name: str = "embeddings", tol: float = 1e-3
) -> np.ndarray:
    """Return ``array`` as contiguous float32 (N, D) after checking it is finite and unit-norm."""
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with non-finite values")
    norms = np.linalg.norm(array, axis=1)
    off = np.abs(norms - 1.0) > tol
    if off.any():
        first = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name} must be L2-normalised: row {first} has norm {norms[first]:.4f} "
            f"({int(off.sum())} rows off); normalise with x / ||x||"
        )
    return array


def l2_normalize(array: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    if (norms <= eps).any():
        raise ValueError("cannot L2-normalise a zero vector")
    return array / norms


def save_embeddings(
    path: str | Path | ObjectPath,
    embeddings: np.ndarray,
    *,
    identities: list[str] | None = None,
    paths: list[str] | None = None,
) -> Any:
    """``path`` (a ``.npy`` path or URL) and its rows file, written through fsio."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = location(path)
    if path.suffix != ".npy":
        raise ValueError(f"embedding file must end in .npy, got {path.name!r}")
    embeddings = check_embeddings(embeddings)
    n = embeddings.shape[0]
    for label, column in (("identities", identities), ("paths", paths)):
        if column is not None and len(column) != n:
            raise ValueError(f"{label} has {len(column)} entries for {n} embeddings")
    buffer = io.BytesIO()
    np.save(buffer, embeddings)
    fsio.atomic_write_bytes(path, buffer.getvalue())
    if identities is not None or paths is not None:
        columns = {}
        if identities is not None:
            columns["identity"] = pa.array(identities, pa.string())
        if paths is not None:
            columns["path"] = pa.array(paths, pa.string())
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink)
        fsio.atomic_write_bytes(rows_path(path), sink.getvalue().to_pybytes())
    return path


def load_embeddings(path: str | Path, *, mmap: bool = False) -> EmbeddingSet:
    """An embedding file (a path or a URL: a store's object is read whole) and its rows."""
    from digi2real.data.manifest import read_npy, read_table

    path = location(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    array = read_npy(path, mmap=mmap)
    if not mmap:
        array = check_embeddings(array, name=str(path))
    identities = paths = None
    rows = rows_path(path)
    if rows.is_file():
        table = read_table(rows)
        if table.num_rows != array.shape[0]:
            raise ValueError(f"{rows} has {table.num_rows} rows for {array.shape[0]} embeddings")
        if "identity" in table.column_names:
            identities = table.column("identity").to_pylist()
        if "path" in table.column_names:
            paths = table.column("path").to_pylist()
    return EmbeddingSet(array, identities, paths)
