"""A run planned up front: identities -> fixed shards, persisted in ``OUT/.digi2real/``
(:mod:`digi2real.data.layout`): ``plan.parquet`` (shard, identity, files relative to the source
root), ``plan_errors.parquet`` (scan-time error rows), then ``run.json`` (the effective config,
flattened, and the weights/stats digests), whose presence says the plan is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from digi2real.config import Config, flatten, output_differences
from digi2real.data import fsio, ownership
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import error_table, read_table, write_parquet
from digi2real.data.readers import ErrorRow, IdentitySelection, IdentitySource, scan_dataset
from digi2real.data.store import ObjectPath, location
from digi2real.version import __version__

logger = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    pass


@dataclass
class Plan:
    source_root: Path | ObjectPath
    shards: list[list[IdentitySource]]
    errors: list[ErrorRow]

    @property
    def num_identities(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def num_images(self) -> int:
        return sum(len(i.files) for s in self.shards for i in s)

    def iter_identities(self) -> Iterator[tuple[int, IdentitySource]]:
        for shard, identities in enumerate(self.shards):
            for identity in identities:
                yield shard, identity


def make_plan(config: Config) -> Plan:
    if config.source.root is None:
        raise ValueError("source.root is not set: which dataset should be converted?")
    root = location(config.source.root)
    if not root.is_dir():
        raise FileNotFoundError(f"source dataset not found: {root}")
    selection = IdentitySelection.from_spec(config.source.identities)
    sources, errors = scan_dataset(root, select=selection)
    size = config.output.shard_size
    shards = [sources[i : i + size] for i in range(0, len(sources), size)]
    return Plan(root, shards, errors)


def plan_table(plan: Plan) -> pa.Table:
    shards, names, files = [], [], []
    for shard, identity in plan.iter_identities():
        shards.append(shard)
        names.append(identity.name)
        files.append([str(f.relative_to(plan.source_root)) for f in identity.files])
    return pa.table(
        {
            "shard": pa.array(shards, pa.int64()),
            "identity": pa.array(names, pa.string()),
            "files": pa.array(files, pa.list_(pa.string())),
        }
    )


def run_record(config: Config, derived: dict[str, Any]) -> dict[str, Any]:
    return {"version": __version__, "config": flatten(config.to_dict()), "derived": derived}


def prepare_out(
    out: Path | ObjectPath,
    config: Config,
    derived: dict[str, Any],
    *,
    overwrite: bool,
    delete_foreign: bool = False,
) -> Plan:
    """Create or reopen ``out``. A new run plans and persists; an existing one must have an
    output-compatible config and reuses its persisted plan. Several ranks may do this at once
    on one ``out``: each plans the same bytes, and ``run.json`` is written last.
    ``overwrite`` deletes what digi2real wrote in ``out`` first (:func:`ownership.clear`:
    refused while files it did not write are there, unless ``delete_foreign``)."""
    out = location(out)
    paths = OutLayout(out)
    record = run_record(config, derived)
    if overwrite and out.exists():
        ownership.clear(out, delete_foreign=delete_foreign)
    if paths.run_json.is_file():
        old = json.loads(paths.run_json.read_text(encoding="utf-8"))
        diffs = output_differences(old["config"], record["config"])
        diffs += [
            f"{k}: {old['derived'].get(k)!r} -> {v!r}"
            for k, v in record["derived"].items()
            if old["derived"].get(k) != v
        ]
        if diffs:
            raise ConfigMismatchError(
                f"{out} was made with a different config; these would change the output:\n  "
                + "\n  ".join(diffs)
                + "\nuse another OUT, or --overwrite to start over"
            )
        return load_plan(out, config)
    if out.exists() and (foreign := ownership.foreign_files(out)):
        raise ValueError(
            f"{out} exists and is not a digi2real output (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new dir"
        )
    plan = make_plan(config)
    write_parquet(paths.plan, plan_table(plan))
    write_parquet(paths.plan_errors, error_table(plan.errors))
    # run.json last: its presence says the plan is complete
    fsio.atomic_write_bytes(
        paths.run_json, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return plan


def load_plan(out: Path | ObjectPath, config: Config) -> Plan:
    paths = OutLayout(out)
    table = read_table(paths.plan).to_pylist()
    root = location(config.source.root) if config.source.root else Path(".")
    num_shards = max((r["shard"] for r in table), default=-1) + 1
    shards: list[list[IdentitySource]] = [[] for _ in range(num_shards)]
    for row in table:
        shards[row["shard"]].append(
            IdentitySource(row["identity"], [root / f for f in row["files"]])
        )
    errors = [
        ErrorRow(r["path"], r["identity"], r["stage"], r["reason"], r["shard"])
        for r in read_table(paths.plan_errors).to_pylist()
    ]
    return Plan(root, shards, errors)
