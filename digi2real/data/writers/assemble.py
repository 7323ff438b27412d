"""The formats that need global labels (WebDataset keys, RecordIO), assembled from the
committed ImageFolder images and a labelled manifest: at finalisation and in a pruned copy."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from digi2real.data.writers import Sample, get_writer

# what each sample's metadata carries (WebDataset's .json member)
SAMPLE_META = ("identity", "label", "index", "similarity", "seed", "interp_kind")


def assemble_formats(out: Path, formats: list[str], manifest: pa.Table) -> None:
    """Every format of ``formats`` but ``imagefolder`` (the store they are read from)."""
    for fmt in formats:
        if fmt != "imagefolder":
            assemble(out, fmt, manifest)


def assemble(out: Path, fmt: str, manifest: pa.Table) -> None:
    rows = manifest.select(
        ["key", "label", "identity", "index", "shard", "path", "similarity", "seed", "interp_kind"]
    ).to_pylist()
    order = (
        sorted(range(len(rows)), key=lambda i: (rows[i]["label"], rows[i]["index"]))
        if fmt == "recordio"
        else range(len(rows))
    )
    with get_writer(fmt, out) as writer:
        for i in order:
            row = rows[i]
            writer.write(
                Sample(
                    key=row["key"],
                    label=row["label"],
                    identity=row["identity"],
                    index=row["index"],
                    shard=row["shard"],
                    data=(Path(out) / row["path"]).read_bytes(),
                    meta={k: row[k] for k in SAMPLE_META},
                )
            )
