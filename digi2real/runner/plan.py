"""A run planned up front: identities -> fixed shards, persisted in ``OUT/.digi2real/``.

State layout (all under ``OUT/.digi2real/``)::

    run.json                     effective config (flattened) + weights/stats digests
    plan.parquet                 shard, identity, files (relative to the source root)
    plan_errors.parquet          scan-time error rows (unreadable folders, hostile names...)
    cache/shard-NNNNNN.parquet   source embeddings of a shard (re-runs do not re-embed)
    shards/NNNNNN/               a shard's parts; ``manifest.parquet`` is renamed in LAST and
                                 is the commit marker
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from digi2real import __version__
from digi2real.config import Config, flatten, output_differences
from digi2real.data import fsio
from digi2real.data.readers import ErrorRow, IdentitySelection, IdentitySource, scan_dataset

logger = logging.getLogger(__name__)

STATE = ".digi2real"
ERROR_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("identity", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("shard", pa.int64()),
    ]
)


class ConfigMismatchError(ValueError):
    pass


def state_dir(out: Path) -> Path:
    return Path(out) / STATE


def shard_dir(out: Path, shard: int) -> Path:
    return state_dir(out) / "shards" / f"{shard:06d}"


def is_committed(out: Path, shard: int) -> bool:
    return (shard_dir(out, shard) / "manifest.parquet").is_file()


@dataclass
class Plan:
    source_root: Path
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


def error_table(rows: list[ErrorRow]) -> pa.Table:
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


def make_plan(config: Config) -> Plan:
    if config.source.root is None:
        raise ValueError("source.root is not set: which dataset should be converted?")
    root = Path(config.source.root)
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
        files.append([str(Path(f).relative_to(plan.source_root)) for f in identity.files])
    return pa.table(
        {
            "shard": pa.array(shards, pa.int64()),
            "identity": pa.array(names, pa.string()),
            "files": pa.array(files, pa.list_(pa.string())),
        }
    )


def run_record(config: Config, derived: dict[str, Any]) -> dict[str, Any]:
    return {"version": __version__, "config": flatten(config.to_dict()), "derived": derived}


def prepare_out(out: Path, config: Config, derived: dict[str, Any], *, overwrite: bool) -> Plan:
    """Create or reopen ``out``. A new run plans and persists; an existing one must have an
    output-compatible config and reuses its persisted plan."""
    out = Path(out)
    state = state_dir(out)
    record = run_record(config, derived)
    if overwrite and out.exists():
        if not (state / "run.json").is_file() and _has_foreign_files(out):
            raise ValueError(
                f"refusing to --overwrite {out}: it is not empty and is not a digi2real output"
            )
        shutil.rmtree(out)
    if (state / "run.json").is_file():
        old = json.loads((state / "run.json").read_text(encoding="utf-8"))
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
    if out.exists() and _has_foreign_files(out):
        raise ValueError(f"{out} exists and is not a digi2real output; choose an empty or new dir")
    plan = make_plan(config)
    state.mkdir(parents=True, exist_ok=True)
    buffer = pa.BufferOutputStream()
    pq.write_table(plan_table(plan), buffer)
    fsio.atomic_write_bytes(state / "plan.parquet", buffer.getvalue().to_pybytes())
    buffer = pa.BufferOutputStream()
    pq.write_table(error_table(plan.errors), buffer)
    fsio.atomic_write_bytes(state / "plan_errors.parquet", buffer.getvalue().to_pybytes())
    # run.json last: its presence says the plan is complete
    fsio.atomic_write_bytes(
        state / "run.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return plan


def _has_foreign_files(out: Path) -> bool:
    # a state folder without run.json is a planning run that was killed: plan again over it
    return any(entry.name != STATE for entry in out.iterdir())


def load_plan(out: Path, config: Config) -> Plan:
    state = state_dir(out)
    table = pq.read_table(state / "plan.parquet").to_pylist()
    root = Path(config.source.root) if config.source.root else Path(".")
    num_shards = max((r["shard"] for r in table), default=-1) + 1
    shards: list[list[IdentitySource]] = [[] for _ in range(num_shards)]
    for row in table:
        shards[row["shard"]].append(
            IdentitySource(row["identity"], [root / f for f in row["files"]])
        )
    errors = [
        ErrorRow(r["path"], r["identity"], r["stage"], r["reason"], r["shard"])
        for r in pq.read_table(state / "plan_errors.parquet").to_pylist()
    ]
    return Plan(root, shards, errors)
