"""The formats that need global labels (WebDataset keys, RecordIO), assembled from the
committed ImageFolder images and a labelled manifest: at finalisation and in a pruned copy.

On an object store the images are fetched concurrently, a batch at a time (one GET per image
is what ImageFolder on a store costs), and each tar or ``train.rec`` streams to its object."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from digi2real.data import layout
from digi2real.data.store import ObjectPath, location, read_many
from digi2real.data.writers import Sample, get_writer

# what each sample's metadata carries (WebDataset's .json member)
SAMPLE_META = ("identity", "label", "index", "similarity", "seed", "interp_kind")
# images fetched at once from a store: enough requests in flight, bounded memory (~6 KB each)
FETCH_BATCH = 256


def assemble_formats(out: Path | ObjectPath, formats: list[str], manifest: pa.Table) -> None:
    """Every format of ``formats`` but ``imagefolder`` (the store they are read from)."""
    for fmt in formats:
        if fmt != "imagefolder":
            assemble(out, fmt, manifest)


def _image_bytes(out: Any, paths: list[str]) -> Iterator[bytes]:
    if not isinstance(out, ObjectPath):
        for path in paths:
            yield (out / path).read_bytes()
        return
    for start in range(0, len(paths), FETCH_BATCH):
        batch = [out / path for path in paths[start : start + FETCH_BATCH]]
        fetched = read_many(batch)
        for path in batch:
            data = fetched[path]
            if isinstance(data, Exception):
                raise data
            yield data


def assemble(out: Path | ObjectPath, fmt: str, manifest: pa.Table) -> None:
    """One format from the images; a run's attribute columns (the manifest's columns after
    its fixed ones) join each sample's metadata, and a carried mask (its annotation file) is
    the sample's ``seg.png``."""
    from digi2real.data.manifest import MANIFEST_SCHEMA

    out = location(out)
    attributes = [name for name in manifest.column_names if name not in MANIFEST_SCHEMA.names]
    rows = manifest.select(
        [
            "key",
            "label",
            "identity",
            "index",
            "shard",
            "path",
            "similarity",
            "seed",
            "interp_kind",
            *attributes,
        ]
    ).to_pylist()
    masks = "label_matrix" in attributes and fmt == "webdataset"
    options: dict[str, Any] = {}
    if fmt == "recordio":
        rows.sort(key=lambda row: (row["label"], row["index"]))
        # counts up front: the file is then written front to back (an object cannot seek)
        options["expect"] = (len(rows), max((row["label"] for row in rows), default=-1) + 1)
    with get_writer(fmt, out, **options) as writer:
        for row, data in zip(rows, _image_bytes(out, [r["path"] for r in rows]), strict=True):
            writer.write(
                Sample(
                    key=row["key"],
                    label=row["label"],
                    identity=row["identity"],
                    index=row["index"],
                    shard=row["shard"],
                    data=data,
                    meta={k: row[k] for k in (*SAMPLE_META, *attributes)},
                    extras=_mask(out, row["path"]) if masks else {},
                )
            )


def _mask(out: Any, image: str) -> dict[str, bytes]:
    """A sample's carried mask as its ``seg.png`` member, when it has one."""
    path = out / layout.sidecar_of(image, layout.SIDECAR_MASK)
    return {"seg.png": path.read_bytes()} if path.is_file() else {}
