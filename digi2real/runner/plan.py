"""A run planned up front: identities -> fixed shards, persisted in ``OUT/.digi2real/``
(:mod:`digi2real.data.layout`): ``plan.parquet`` (shard, identity, files relative to the source
root), ``plan_errors.parquet`` (scan-time error rows), ``attributes.parquet`` (the planned
images' ground truth, when the source has any: a labelled layout's labels, an ``--attributes``
table), then ``run.json`` (the effective config, flattened, and the weights/stats digests),
whose presence says the plan is complete.

The attribute options are checked here, before any work: a ``--where`` or ``--balance`` that
names an unknown attribute, or a hostile expression, stops the run with nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from digi2real.config import Config, flatten, output_differences
from digi2real.data import attributes as attrs
from digi2real.data import fsio, ownership
from digi2real.data.labelled import LABELLED_LAYOUTS, resolve_layout, scan_source
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import error_table, read_table, write_parquet
from digi2real.data.readers import (
    OUTSIDE_IDENTITY,
    ErrorRow,
    IdentitySelection,
    IdentitySource,
)
from digi2real.data.store import ObjectPath, location
from digi2real.version import __version__

logger = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
    pass


class NothingToConvertError(ValueError):
    """A source (as selected) with no usable identity: a run of it would write nothing."""


@dataclass
class Plan:
    source_root: Path | ObjectPath
    shards: list[list[IdentitySource]]
    errors: list[ErrorRow]
    attributes: attrs.SourceAttributes = dataclasses.field(default_factory=attrs.SourceAttributes)
    edges: tuple[float, ...] | None = None  # --balance's bin edges

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
    source_layout = resolve_layout(root, config.source.layout)
    attributes = attrs.SourceAttributes()
    sources, errors = scan_source(root, source_layout, select=selection)
    if source_layout in LABELLED_LAYOUTS:
        attributes, sources, label_errors = attrs.labelled_attributes(root, source_layout, sources)
        errors = errors + label_errors
    images = [attrs.normal_path(str(f.relative_to(root))) for s in sources for f in s.files]
    if config.source.attributes is not None:
        table = attrs.match_table(attrs.read_attribute_table(config.source.attributes), images)
        if table.counts["rows_without_image"] or table.counts["images_without_row"]:
            logger.warning(
                "attribute table: %d row(s) match no image, %d image(s) have no row",
                table.counts["rows_without_image"],
                table.counts["images_without_row"],
            )
        attributes = attrs.merge(attributes, table)
    if not sources:
        raise NothingToConvertError(nothing_found(root, source_layout, selection, errors))
    attributes = attributes.restrict(set(images)) if attributes else attributes
    edges = balance_edges(config, attributes, images)
    size = config.output.shard_size
    shards = [sources[i : i + size] for i in range(0, len(sources), size)]
    return Plan(root, shards, errors, attributes, edges)


def nothing_found(
    root: Path | ObjectPath, layout: str, selection: IdentitySelection, errors: list[ErrorRow]
) -> str:
    """Why a source yields no identity, in one line: a selection that matches none, or what
    the scan skipped (the most common reasons), with the likely mistake where there is one."""
    if selection.kind != "all":
        everything, _ = scan_source(root, layout)
        if everything:
            return (
                f"--identities {selection.to_spec()} selects none of the {len(everything)} "
                f"identities in {root}"
            )
    reasons = Counter(error.reason for error in errors)
    found = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    line = f"no usable identity in {root}" + (f" (skipped: {found})" if found else "")
    if OUTSIDE_IDENTITY in reasons:
        line += (
            ": it looks like one identity's folder; give the folder that holds one folder per "
            "identity"
        )
    return line


def attribute_models(config: Config) -> tuple[str, ...]:
    """The optional attribute models (buffalo_l's 1k3d68, genderage) ``config``'s weights dir
    holds; none without weights."""
    if config.weights is None:
        return ()
    from digi2real.weights import open_weights

    weights = open_weights(config.weights)
    return tuple(group for group in attrs.MODEL_ESTIMATES if weights.has(group))


def balance_edges(
    config: Config, attributes: attrs.SourceAttributes, images: list[str]
) -> tuple[float, ...] | None:
    """``--balance``'s bin edges, fixed for the whole run (so no output depends on sharding):
    explicit, or equal widths over the planned images' ground truth (those a ``--where`` on
    ground truth keeps). An estimate is known only as shards run: it needs explicit edges."""
    # checks where and balance
    control = attrs.resolve_control(config, attributes, models=attribute_models(config))
    balance = control.balance
    if balance is None:
        return None
    if balance.edges is not None:
        return balance.edges
    if balance.column not in attributes.columns:
        raise attrs.AttributeSpecError(
            f"--balance {balance.column}:{balance.bins}: {balance.column!r} is estimated as "
            "shards run, so its range is not known up front: give the bin edges, e.g. "
            f"--balance {balance.column}:-90,-30,30,90"
        )
    if not pa.types.is_integer(attributes.columns[balance.column]) and not pa.types.is_floating(
        attributes.columns[balance.column]
    ):
        raise attrs.AttributeSpecError(f"--balance: attribute {balance.column!r} is not a number")
    where = control.where
    if where is not None and not set(where.names) <= set(attributes.columns):
        where = None  # it names estimates: the range is over every planned image
    columns = {name: attrs.column_values(attributes, name, images) for name in attributes.columns}
    chosen = where.evaluate(columns, len(images)) if where is not None else slice(None)
    values = np.asarray(columns[balance.column], dtype=np.float64)[chosen]
    return balance.resolve(values)


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
    if overwrite or not paths.run_json.is_file():
        # SRC is read before OUT is touched: a source that cannot be planned refuses the run
        # with OUT as it was
        plan = make_plan(config)
        if overwrite and out.exists():
            ownership.clear(out, delete_foreign=delete_foreign)
        return _new_run(out, plan, record)
    if paths.run_json.is_file():
        old = read_run_record(paths.run_json)
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
    raise AssertionError("unreachable")  # pragma: no cover


def read_run_record(path: Path | ObjectPath) -> dict[str, Any]:
    """An OUT's ``run.json`` (what :func:`run_record` wrote); a damaged one is one ValueError
    naming it, and how to start over."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8, not JSON (a truncated copy, an edit)
        record = error
    if not (
        isinstance(record, dict)
        and isinstance(record.get("config"), dict)
        and isinstance(record.get("derived"), dict)
    ):
        why = f"not JSON ({record})" if isinstance(record, ValueError) else "not a run record"
        raise ValueError(
            f"{path}: {why}: this OUT's run state is damaged; use another OUT, or --overwrite "
            "to start over"
        )
    return record


def _new_run(out: Path | ObjectPath, plan: Plan, record: dict[str, Any]) -> Plan:
    """Persist a new run's plan in ``out`` (which holds nothing but digi2real's files)."""
    paths = OutLayout(out)
    if out.exists() and (foreign := ownership.foreign_files(out)):
        raise ValueError(
            f"{out} exists and is not a digi2real output (it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new dir"
        )
    write_parquet(paths.plan, plan_table(plan))
    write_parquet(paths.plan_errors, error_table(plan.errors))
    if plan.attributes or plan.edges is not None:
        table = plan.attributes.to_table()
        meta = json.loads(table.schema.metadata[b"digi2real"])
        meta["edges"] = list(plan.edges) if plan.edges is not None else None
        write_parquet(
            paths.attributes,
            table.replace_schema_metadata({"digi2real": json.dumps(meta, sort_keys=True)}),
        )
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
    attributes, edges = load_attributes(out)
    return Plan(root, shards, errors, attributes, edges)


def load_attributes(
    out: Path | ObjectPath,
) -> tuple[attrs.SourceAttributes, tuple[float, ...] | None]:
    """The planned images' ground truth and ``--balance``'s edges, as planned."""
    path = OutLayout(out).attributes
    if not path.is_file():
        return attrs.SourceAttributes(), None
    table = read_table(path)
    edges = json.loads(table.schema.metadata[b"digi2real"]).get("edges")
    return attrs.SourceAttributes.from_table(table), tuple(edges) if edges else None
