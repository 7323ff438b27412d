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
    """An embedding file (a path or a URL: a store's object is read whole) and its rows.

    The rows must be finite and not zero; rows that are not unit-norm (``|norm - 1| >
    1e-3``, e.g. raw ArcFace outputs) are normalised, with one warning naming the file.
    ``mmap``: memory-mapped where the file is local and needs no normalising."""
    from digi2real.data.manifest import read_table

    path = location(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    array = unit_rows(read_embedding_array(path, mmap=mmap), str(path))
    identities = paths = None
    rows = rows_path(path)
    if rows.is_file():
        try:
            table = read_table(rows)
        except ValueError as error:  # pyarrow's ArrowInvalid: not a parquet file
            raise ValueError(f"{rows} is not a readable parquet file ({error})") from None
        if table.num_rows != array.shape[0]:
            raise ValueError(f"{rows} has {table.num_rows} rows for {array.shape[0]} embeddings")
        if "identity" in table.column_names:
            identities = table.column("identity").to_pylist()
        if "path" in table.column_names:
            paths = table.column("path").to_pylist()
    return EmbeddingSet(array, identities, paths)


def read_embedding_array(path: Any, *, mmap: bool = False) -> np.ndarray:
    """The (N, D) floating-point array of an ``.npy`` file, never unpickling anything: a file
    numpy cannot read (random bytes, truncated, a pickle, an object array) or of another
    shape or dtype is one ValueError naming it."""
    from digi2real.data.manifest import read_npy

    try:
        array = read_npy(path, mmap=mmap)
    except EOFError:
        raise ValueError(f"{path} is empty: not a .npy array") from None
    except ValueError as error:
        text = str(error)
        if "Object arrays" in text or "Python objects" in text:
            raise ValueError(
                f"{path} holds pickled Python objects, which are never unpickled: save a "
                "float32 (N, D) array"
            ) from None
        if "pickled" in text:  # no .npy header: numpy would unpickle the whole file
            raise ValueError(f"{path} is not a .npy array (no .npy header)") from None
        raise ValueError(f"{path} is not a readable .npy array ({text})") from None
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{path}: expected a non-empty (N, D) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected floating-point embeddings, got dtype {array.dtype}")
    return array


def unit_rows(array: np.ndarray, name: str, *, tol: float = 1e-3, block: int = 8192) -> np.ndarray:
    """``array`` (N, D) as float32 unit rows. Rows with NaN/inf or a norm under 1e-6 (no
    direction) are refused; rows whose norm is off 1 by more than ``tol`` are normalised, with
    one warning. Read ``block`` rows at a time: a memory-mapped float32 array of unit rows is
    returned as it is, memory flat in N."""
    n = array.shape[0]
    norms = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        # through float32, the dtype returned: a value beyond its range is inf, refused below
        chunk = np.asarray(array[start : start + block], dtype=np.float32)
        norms[start : start + len(chunk)] = np.linalg.norm(chunk.astype(np.float64), axis=1)
    for wrong, what in (
        (~np.isfinite(norms), "hold NaN or infinite values"),
        (norms < 1e-6, "are zero vectors (norm < 1e-6), with no direction to compare"),
    ):
        if wrong.any():
            first = int(np.flatnonzero(wrong)[0])
            raise ValueError(f"{name}: {int(wrong.sum())} row(s) {what} (first: row {first})")
    off = np.abs(norms - 1.0) > tol
    if not off.any():
        return array if array.dtype == np.float32 else np.ascontiguousarray(array, np.float32)
    first = int(np.flatnonzero(off)[0])
    logger.warning(
        "%s: %d of %d rows are not unit-norm (|norm - 1| > %g; row %d: %.4g); normalised "
        "to x / ||x||",
        name,
        int(off.sum()),
        n,
        tol,
        first,
        norms[first],
    )
    normalised = np.empty(array.shape, dtype=np.float32)
    for start in range(0, n, block):
        chunk = np.asarray(array[start : start + block], dtype=np.float32).astype(np.float64)
        normalised[start : start + len(chunk)] = chunk / norms[start : start + len(chunk), None]
    return normalised
