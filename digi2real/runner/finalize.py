"""Finalisation: committed shard parts -> the dataset's global files.

Runs in the driver once every shard is committed, and is idempotent: every file it writes is
rebuilt from the shard parts, so a crash during finalisation is repaired by running it again.
Labels are assigned here (contiguous over sorted accepted identity names, torchvision
ImageFolder order); formats that need them (WebDataset keys, RecordIO) are assembled here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from digi2real import __version__, faults
from digi2real.config import Config, merge_environment, split_environment
from digi2real.data import fsio
from digi2real.data.writers import Sample, get_writer, sample_key
from digi2real.runner.plan import (
    STATE,
    Plan,
    error_table,
    is_committed,
    shard_dir,
    state_dir,
)
from digi2real.runner.shard import MANIFEST_SCHEMA, ORIGINALS, REJECTED_SCHEMA

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    out: Path
    identities: int
    images: int
    rejected: int
    errors: int
    formats: list[str]
    events: list[str] = field(default_factory=list)  # e.g. CUDA OOM batch halvings

    def counts(self) -> dict[str, int]:
        return {
            "identities": self.identities,
            "images": self.images,
            "rejected": self.rejected,
            "errors": self.errors,
        }

    def lines(self) -> list[str]:
        return [
            f"accepted images:   {self.images} ({self.identities} identities)",
            f"rejected targets:  {self.rejected}  -> {self.out / 'rejected.parquet'}",
            f"errors (skipped):  {self.errors}  -> {self.out / 'errors.parquet'}",
            f"images:            {self.out / 'images'}",
            f"manifest:          {self.out / 'manifest.parquet'}",
            f"formats:           {', '.join(self.formats)}",
            *(f"event:             {event}" for event in self.events),
        ]


def _write_parquet(path: Path, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    fsio.atomic_write_bytes(path, buffer.getvalue().to_pybytes())


def _write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    fsio.atomic_write_bytes(path, buffer.getvalue())


def environment(device: str, dtype: str, compile_flag: bool) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "onnxruntime-gpu",
        "onnxruntime",
        "insightface",
        "numpy",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return {
        "digi2real": __version__,
        "python": platform.python_version(),
        "packages": versions,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "device": device,
        "dtype": dtype,
        "compile": compile_flag,
    }


def finalize(
    out: Path,
    config: Config,
    plan: Plan,
    *,
    weights_manifest: dict[str, Any],
    env: dict[str, Any],
    shift: dict[str, Any] | None = None,
) -> Summary:
    out = Path(out)
    missing = [s for s in range(len(plan.shards)) if not is_committed(out, s)]
    if missing:
        raise RuntimeError(f"cannot finalise: shards not committed: {missing[:20]}")
    faults.point("finalize-start")
    _remove_stale_temps(out)
    manifests, rejected, errors, outputs, targets = [], [], [error_table(plan.errors)], [], []
    for shard in range(len(plan.shards)):
        part = shard_dir(out, shard)
        manifests.append(pq.read_table(part / "manifest.parquet", schema=MANIFEST_SCHEMA))
        rejected.append(pq.read_table(part / "rejected.parquet", schema=REJECTED_SCHEMA))
        errors.append(pq.read_table(part / "errors.parquet").cast(errors[0].schema))
        outputs.append(np.load(part / "outputs.npy"))
        targets.append(np.load(part / "targets.npy"))
    manifest = pa.concat_tables(manifests) if manifests else MANIFEST_SCHEMA.empty_table()
    identities = sorted(set(manifest.column("identity").to_pylist()))
    labels = {name: i for i, name in enumerate(identities)}
    label_col = [labels[n] for n in manifest.column("identity").to_pylist()]
    key_col = [
        sample_key(lab, idx)
        for lab, idx in zip(label_col, manifest.column("index").to_pylist(), strict=True)
    ]
    manifest = manifest.set_column(
        manifest.schema.get_field_index("label"), "label", pa.array(label_col, pa.int64())
    )
    manifest = manifest.set_column(
        manifest.schema.get_field_index("key"), "key", pa.array(key_col, pa.string())
    )
    state = state_dir(out)
    dim = outputs[0].shape[1] if outputs else 0
    _write_npy(state / "outputs.npy", np.concatenate(outputs) if outputs else np.zeros((0, dim)))
    _write_npy(state / "targets.npy", np.concatenate(targets) if targets else np.zeros((0, dim)))
    rejected_table = pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()
    errors_table = pa.concat_tables(errors)
    _write_parquet(out / "rejected.parquet", rejected_table)
    _write_parquet(out / "errors.parquet", errors_table)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["label", "identity"])
    writer.writerows((i, name) for name, i in labels.items())
    fsio.atomic_write_bytes(out / "labels.csv", text.getvalue().encode("utf-8"))
    faults.point("finalize-parts")

    _remove_orphans(out, set(manifest.column("path").to_pylist()))
    assemble_formats(out, config.output.formats, manifest)
    faults.point("finalize-formats")

    full = config.to_dict()
    full["source"]["root"] = str(plan.source_root)
    portable, moved = split_environment(full)
    record = {
        "config": portable,
        "weights": {
            "profile": weights_manifest.get("profile"),
            "digest": weights_manifest.get("digest"),
            # every file with checksum and licence: the licence chain travels with the data
            "files": [
                {
                    k: f.get(k)
                    for k in ("path", "component", "sha256", "license", "license_url", "commercial")
                }
                for f in weights_manifest.get("files", [])
            ],
        },
        # what the domain shift was made of (stats checksums, face counts, positions...)
        "shift": shift,
        "environment": {**env, **moved},
    }
    fsio.atomic_write_bytes(
        out / "config.yaml", yaml.safe_dump(record, sort_keys=True, allow_unicode=True).encode()
    )
    summary = Summary(
        out,
        len(identities),
        manifest.num_rows,
        rejected_table.num_rows,
        errors_table.num_rows,
        list(config.output.formats),
    )
    write_card(out, record, counts=summary.counts())
    # the manifest last: a dataset with manifest.parquet is a finished dataset
    _write_parquet(out / "manifest.parquet", manifest)
    return summary


def _remove_stale_temps(out: Path) -> None:
    """Temporary files of writes that a killed run never finished (finalisation runs alone;
    images/ is cleaned by :func:`_remove_orphans`, run state needs no cleaning)."""
    for dirpath, dirs, files in os.walk(out):
        if Path(dirpath) == out:
            dirs[:] = [d for d in dirs if d not in (STATE, "images")]
        for name in files:
            if fsio.is_temp_name(name):
                logger.info("removing stale temporary file %s", Path(dirpath, name))
                (Path(dirpath) / name).unlink()


def _remove_orphans(out: Path, paths: set[str]) -> None:
    """Images left by an interrupted attempt whose shard was redone differently (a batch-size
    change can move a borderline similarity across the threshold) have no manifest row."""
    for folder in ("images", ORIGINALS):
        base = out / folder
        if not base.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                # originals/ mirrors images/: an original's row is its crop's row
                rel = "images/" + path.relative_to(base).as_posix()
                if rel not in paths:
                    logger.info("removing orphan image %s", path.relative_to(out))
                    path.unlink()


def assemble_formats(out: Path, formats: list[str], manifest: pa.Table) -> None:
    """The training formats that need global labels, from the committed images."""
    for fmt in formats:
        if fmt != "imagefolder":
            _assemble(out, fmt, manifest)


def _assemble(out: Path, fmt: str, manifest: pa.Table) -> None:
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
            data = (out / row["path"]).read_bytes()
            meta = {
                k: row[k]
                for k in ("identity", "label", "index", "similarity", "seed", "interp_kind")
            }
            writer.write(
                Sample(
                    key=row["key"],
                    label=row["label"],
                    identity=row["identity"],
                    index=row["index"],
                    shard=row["shard"],
                    data=data,
                    meta=meta,
                )
            )


def write_card(
    out: Path, record: dict[str, Any] | None = None, *, counts: dict[str, int] | None = None
) -> Path:
    """(Re)write ``OUT/DATASET_CARD.md`` from config.yaml, the counts and, when a report has
    been made, its headline figures. Finalisation, ``report`` and ``prune`` call it."""
    from digi2real.card import write_dataset_card

    out = Path(out)
    if record is None:
        record = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    if counts is None:
        manifest = pq.read_table(out / "manifest.parquet", columns=["identity"])
        counts = {
            "identities": len(set(manifest.column("identity").to_pylist())),
            "images": manifest.num_rows,
            "rejected": pq.ParquetFile(out / "rejected.parquet").metadata.num_rows,
            "errors": pq.ParquetFile(out / "errors.parquet").metadata.num_rows,
        }
    report = None
    report_path = out / "report" / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
    weights = record.get("weights", {})
    # the portable config, plus the source root (the card shows its folder name and reads it
    # to recognise DigiFace-1M's licence); placement stays out so runners give one card
    config = json.loads(json.dumps(record["config"]))
    root = merge_environment(record)["source"].get("root")
    config["source"]["root"] = root
    return write_dataset_card(
        out,
        config=config,
        counts=counts,
        report=report,
        weights_manifest={"profile": weights.get("profile"), "files": weights.get("files", [])},
        source_license=config["source"].get("license"),
    )
