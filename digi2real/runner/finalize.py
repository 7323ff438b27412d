"""Finalisation: committed shard parts -> the dataset's global files.

Runs in the driver once every shard is committed, and is idempotent: every file it writes is
rebuilt from the shard parts, so a crash during finalisation is repaired by running it again.
Labels are assigned here (contiguous over sorted accepted identity names, torchvision
ImageFolder order); formats that need them (WebDataset keys, RecordIO) are assembled here.
"""

from __future__ import annotations

import logging
import platform
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from digi2real.analysis.card import write_card
from digi2real.config import Config, dump_yaml, split_environment
from digi2real.data import fsio, layout, ownership
from digi2real.data.attributes import resolve_control
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import (
    ERROR_SCHEMA,
    REJECTED_SCHEMA,
    assign_labels,
    error_table,
    manifest_schema,
    read_npy,
    read_table,
    write_labels,
    write_npy,
    write_parquet,
)
from digi2real.data.store import ObjectPath, files_under, location
from digi2real.data.writers.assemble import assemble_formats
from digi2real.runner import faults
from digi2real.runner.plan import Plan, attribute_models
from digi2real.version import __version__

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    out: Path | ObjectPath
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
        paths = OutLayout(self.out)
        return [
            f"accepted images:   {self.images} ({self.identities} identities)",
            f"rejected targets:  {self.rejected}  -> {paths.rejected}",
            f"errors (skipped):  {self.errors}  -> {paths.errors}",
            f"images:            {paths.images}",
            f"manifest:          {paths.manifest}",
            f"formats:           {', '.join(self.formats)}",
            *(f"event:             {event}" for event in self.events),
        ]


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
    out: Path | ObjectPath | str,
    config: Config,
    plan: Plan,
    *,
    weights_manifest: dict[str, Any],
    env: dict[str, Any],
    shift: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
) -> Summary:
    """``lora``: the LoRA fused into the UNet (name, sha256, scale), recorded in config.yaml
    and the card (its path is host-dependent and stays under the environment)."""
    out = location(out)
    paths = OutLayout(out)
    committed = paths.committed()
    missing = [s for s in range(len(plan.shards)) if s not in committed]
    if missing:
        raise RuntimeError(f"cannot finalise: shards not committed: {missing[:20]}")
    # ranks of a multi-node run that finish together may both finalise: one at a time on a
    # shared file system (the sweep below must not take another's temporary files); on a
    # store they write the same objects, whole
    with fsio.exclusive(paths.state):
        return _finalize(out, config, plan, weights_manifest, env, shift, lora)


def _finalize(
    out: Path | ObjectPath,
    config: Config,
    plan: Plan,
    weights_manifest: dict[str, Any],
    env: dict[str, Any],
    shift: dict[str, Any] | None,
    lora: dict[str, Any] | None,
) -> Summary:
    paths = OutLayout(out)
    faults.point("finalize-start")
    # finalisation runs alone; images/ and originals/ are cleaned by _remove_orphans, run
    # state needs none, and a folder of the user's is not looked into
    fsio.remove_stale_temps(out)
    for folder in (layout.WEBDATASET, layout.RECORDIO, layout.REPORT):
        fsio.remove_stale_temps(out / folder)
    # a killed Ray driver's attempt markers, whatever runner resumed its output
    fsio.remove_tree(paths.state / layout.ATTEMPTS)
    manifests, rejected, errors, outputs, targets = [], [], [error_table(plan.errors)], [], []
    control = resolve_control(config, plan.attributes, plan.edges, attribute_models(config))
    schema = manifest_schema(control.fields())
    for shard in range(len(plan.shards)):
        part = paths.shard(shard)
        manifests.append(read_table(part / layout.MANIFEST, schema=schema))
        rejected.append(read_table(part / layout.REJECTED, schema=REJECTED_SCHEMA))
        errors.append(read_table(part / layout.ERRORS, schema=ERROR_SCHEMA))
        outputs.append(read_npy(part / layout.OUTPUTS))
        targets.append(read_npy(part / layout.TARGETS))
    manifest = pa.concat_tables(manifests) if manifests else schema.empty_table()
    manifest, labels = assign_labels(manifest)
    dim = outputs[0].shape[1] if outputs else 0
    write_npy(paths.outputs, np.concatenate(outputs) if outputs else np.zeros((0, dim)))
    write_npy(paths.targets, np.concatenate(targets) if targets else np.zeros((0, dim)))
    rejected_table = pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()
    errors_table = pa.concat_tables(errors)
    write_parquet(paths.rejected, rejected_table)
    write_parquet(paths.errors, errors_table)
    write_labels(paths.labels, labels)
    faults.point("finalize-parts")

    _remove_orphans(out, set(manifest.column("path").to_pylist()), plan)
    if control.active:
        write_parquet(paths.images / layout.IMAGES_METADATA, images_metadata(manifest, control))
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
        "lora": lora,
        "environment": {**env, **moved},
    }
    if control.active:
        record["attributes"] = {
            "origin": control.attributes.origin,
            "columns": [f.name for f in control.fields()],
            "geometry": control.geometry,
            "where": config.attributes.where,
            "balance": config.attributes.balance,
            "edges": list(control.edges) if control.edges is not None else None,
            **({"table": control.attributes.counts} if control.attributes.counts else {}),
        }
    fsio.atomic_write_bytes(paths.config, dump_yaml(record).encode())
    summary = Summary(
        out,
        len(labels),
        manifest.num_rows,
        rejected_table.num_rows,
        errors_table.num_rows,
        list(config.output.formats),
    )
    write_card(out, record, counts=summary.counts())
    # the manifest last: a dataset with manifest.parquet is a finished dataset
    write_parquet(paths.manifest, manifest)
    return summary


def images_metadata(manifest: pa.Table, control: Any) -> pa.Table:
    """``images/metadata.parquet``: what `datasets`' imagefolder loader joins to each image
    (``file_name`` relative to ``images/``), typed: its identity and label, its attributes."""
    prefix = f"{layout.IMAGES}/"
    names = [field.name for field in control.fields()]
    return pa.table(
        {
            "file_name": pa.array(
                [p.removeprefix(prefix) for p in manifest.column("path").to_pylist()], pa.string()
            ),
            "identity": manifest.column("identity"),
            "label": manifest.column("label"),
            **{name: manifest.column(name) for name in names},
        }
    )


def _remove_orphans(out: Path | ObjectPath, paths: set[str], plan: Plan) -> None:
    """Images left by an interrupted attempt whose shard was redone differently (a batch-size
    change can move a borderline similarity across the threshold) have no manifest row. Only
    digi2real's own names are candidates (:mod:`~digi2real.data.ownership`): a file a user put
    there stays, and is named."""
    identities = frozenset(
        unicodedata.normalize("NFC", identity.name) for _, identity in plan.iter_identities()
    )
    foreign = []
    for folder in (layout.IMAGES, layout.ORIGINALS, layout.ANNOTATIONS):
        for rel, path in files_under(out / folder):
            relative = f"{folder}/{rel}"
            if relative == f"{layout.IMAGES}/{layout.IMAGES_METADATA}":
                continue  # rewritten by this finalisation
            if path.is_symlink() or not ownership.is_owned(relative, identities):
                foreign.append(relative)
            # originals/ and annotations/ mirror images/: an original's row is its crop's
            # row, a sidecar's its image's
            elif f"{layout.IMAGES}/{layout.image_of(rel)}" not in paths:
                logger.info("removing orphan image %s", relative)
                fsio.remove(path)
    if foreign:
        logger.warning(
            "%d file(s) in %s that digi2real did not write were left alone: %s%s",
            len(foreign),
            out,
            ", ".join(foreign[: ownership.SHOWN]),
            " ..." if len(foreign) > ownership.SHOWN else "",
        )
