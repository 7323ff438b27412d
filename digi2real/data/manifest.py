"""The dataset's tables: manifest / rejected / errors schemas, labels, and their writing.

Labels are contiguous integers over the sorted accepted identity names (torchvision
ImageFolder order); a sample's key is :func:`~digi2real.data.writers.sample_key` of its label
and index. Finalisation and ``prune`` both assign them with :func:`assign_labels`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digi2real.data import fsio
from digi2real.data.readers import ErrorRow
from digi2real.data.store import ObjectPath
from digi2real.data.writers import sample_key

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("identity", pa.string()),
        ("label", pa.int64()),
        ("path", pa.string()),
        ("index", pa.int64()),
        ("attempt", pa.int64()),
        ("seed", pa.int64()),
        ("interp_kind", pa.string()),
        ("source_paths", pa.list_(pa.string())),
        ("interp_weights", pa.list_(pa.float64())),
        ("sampler", pa.string()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("dtype", pa.string()),
        ("shift_method", pa.string()),
        ("shift_alpha", pa.float64()),
        ("init_path", pa.string()),  # the source render the diffusion started from, or null
        ("init_strength", pa.float64()),
        ("lora_digest", pa.string()),  # sha256 of the LoRA fused into the UNet, or null
        ("decoder", pa.string()),  # vae | tiny (TAESD)
        ("similarity", pa.float64()),
        ("shard", pa.int64()),
        ("weights_digest", pa.string()),
        ("version", pa.string()),
    ]
)


def manifest_schema(extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The manifest's columns: the fixed ones, then a run's attribute columns
    (:meth:`digi2real.data.attributes.Control.fields`; none for a run without attributes)."""
    return pa.schema([*MANIFEST_SCHEMA, *extra]) if extra else MANIFEST_SCHEMA


REJECTED_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),
        ("index", pa.int64()),
        ("attempts", pa.int64()),
        ("seeds", pa.list_(pa.int64())),
        ("best_similarity", pa.float64()),
        ("reason", pa.string()),
        ("interp_kind", pa.string()),
        ("source_paths", pa.list_(pa.string())),
        ("interp_weights", pa.list_(pa.float64())),
        ("shard", pa.int64()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("identity", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("shard", pa.int64()),
    ]
)


def error_table(rows: Sequence[ErrorRow]) -> pa.Table:
    return pa.table(
        {
            "path": [r.path for r in rows],
            "identity": [r.identity for r in rows],
            "stage": [r.stage for r in rows],
            "reason": [r.reason for r in rows],
            "shard": [r.shard for r in rows],
        },
        schema=ERROR_SCHEMA,
    )


def read_table(
    path: str | Path | ObjectPath,
    columns: Sequence[str] | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """One parquet file (``columns`` of it; ``schema``: cast to it), local or on a store.
    ``pq.read_table`` goes through pyarrow.dataset, which imports pandas: half a second a
    command that only reads a manifest should not pay."""
    source = pa.BufferReader(path.read_bytes()) if isinstance(path, ObjectPath) else path
    table = pq.ParquetFile(source).read(columns=list(columns) if columns is not None else None)
    return table if schema is None else table.cast(schema)


def parquet_rows(path: str | Path | ObjectPath) -> int:
    """The number of rows of a parquet file, from its footer (local) or its object."""
    source = pa.BufferReader(path.read_bytes()) if isinstance(path, ObjectPath) else path
    return int(pq.ParquetFile(source).metadata.num_rows)


def read_npy(path: str | Path | ObjectPath, *, mmap: bool = False) -> np.ndarray:
    """An ``.npy`` array; ``mmap``: memory-mapped where the file is local (a store's object
    is read whole)."""
    if isinstance(path, ObjectPath):
        return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def write_parquet(path: str | Path, table: pa.Table) -> Path:
    return fsio.atomic_write_bytes(path, parquet_bytes(table))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """An (N, D) float32 array as ``.npy``, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return fsio.atomic_write_bytes(path, buffer.getvalue())


def assign_labels(manifest: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """``manifest`` with its ``label`` and ``key`` columns set from the identities it holds,
    and the identity -> label map (in label order)."""
    identities = manifest.column("identity").to_pylist()
    labels = {name: label for label, name in enumerate(sorted(set(identities)))}
    label_column = [labels[name] for name in identities]
    key_column = [
        sample_key(label, index)
        for label, index in zip(label_column, manifest.column("index").to_pylist(), strict=True)
    ]
    manifest = manifest.set_column(
        manifest.schema.get_field_index("label"), "label", pa.array(label_column, pa.int64())
    )
    manifest = manifest.set_column(
        manifest.schema.get_field_index("key"), "key", pa.array(key_column, pa.string())
    )
    return manifest, labels


def write_labels(path: str | Path, labels: dict[str, int]) -> Path:
    """``labels.csv``: ``label,identity`` rows in label order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["label", "identity"])
    writer.writerows(sorted(((label, name) for name, label in labels.items())))
    return fsio.atomic_write_bytes(path, text.getvalue().encode("utf-8"))
