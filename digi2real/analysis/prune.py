"""A cleaned copy of a converted dataset without colliding or leaking identities.

The original OUT is never written to. ``prune`` copies (or hard-links) the kept images,
filters the manifest and the row-aligned embedding arrays, renumbers labels contiguously
over the sorted remaining identity names and rewrites ``labels.csv``. Of two colliding
identities the one with the LOWER label stays. The returned manifest table is the hook for
re-assembling the shard formats (WebDataset, RecordIO) in the copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.analysis.report import load_report
from digi2real.data import fsio, layout
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import assign_labels, read_table, write_labels, write_parquet

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)


def identities_to_drop(
    report: dict[str, Any], *, drop_collisions: bool, drop_leaks: bool
) -> dict[str, str]:
    """Identity name -> reason, from a report's collision and leakage lists.

    Collisions are resolved greedily in label order: an identity stays unless it collides
    with a lower-labelled identity that itself stays, so of each pair the lower label
    survives and a chain a~b~c keeps a and c (c no longer collides with anything kept).
    With ``drop_leaks`` a leaking identity is gone first and does not cost its partner.
    """
    dropped: dict[str, str] = {}
    if drop_leaks:
        leakage = report.get("leakage")
        if leakage is None:
            raise ValueError("drop_leaks needs a report built with a gallery (it has no leakage)")
        for leak in leakage["leaks"]:
            dropped[leak["identity"]] = (
                f"leaks into gallery identity {leak['gallery_identity']} ({leak['score']:.4f})"
            )
    if drop_collisions:
        partners: dict[tuple[int, str], list[tuple[int, str, float]]] = {}
        for pair in report["separation"]["collisions"]:
            low, high = sorted(
                [(pair["label_a"], pair["a"]), (pair["label_b"], pair["b"])], key=lambda x: x[0]
            )
            partners.setdefault(low, []).append((*high, pair["score"]))
        # A leaking identity is gone already, so its higher partner no longer collides.
        removed: set[str] = set(dropped)
        for label, name in sorted(partners):
            if name in removed:
                continue
            for _, other, score in partners[(label, name)]:
                if other not in removed:
                    removed.add(other)
                    dropped.setdefault(other, f"collides with {name} (label {label}, {score:.4f})")
    return dropped


def _write_rows(source: Path, target: Path, rows: np.ndarray, block: int) -> None:
    """Write ``source[rows]`` as a new .npy, streamed in blocks (never the whole array)."""
    array = np.load(source, mmap_mode="r", allow_pickle=False)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
    header["shape"] = (len(rows), *array.shape[1:])
    with fsio.atomic_open(target) as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, len(rows), block):
            handle.write(metrics.read_block(array, rows[start : start + block]).tobytes())


def prune(
    out_dir: str | Path,
    dest: str | Path,
    *,
    drop_collisions: bool,
    drop_leaks: bool,
    report: dict[str, Any] | None = None,
    keys_only: bool = False,
    link: bool = True,
    block: int = metrics.DEFAULT_BLOCK,
) -> pa.Table:
    """Write a cleaned copy of ``out_dir`` to ``dest``; return the new manifest (pyarrow Table).

    ``report`` defaults to ``out_dir/report/report.json``. ``keys_only`` writes just
    ``dest/kept_keys.txt`` (the ORIGINAL keys of the kept images, manifest order) and returns
    the kept manifest rows unchanged. ``link`` hard-links images where the filesystem allows.
    The copy holds images/, manifest.parquet, labels.csv, config.yaml, the filtered
    .digi2real/{outputs,targets}.npy, rejected/errors parquet and prune.json; shard formats,
    report and dataset card are for the caller to rebuild from the returned table.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    out_dir = Path(out_dir).resolve()
    dest = Path(dest).resolve()
    if not drop_collisions and not drop_leaks:
        raise ValueError("nothing to prune: set drop_collisions and/or drop_leaks")
    if dest == out_dir or out_dir in dest.parents or dest in out_dir.parents:
        raise ValueError(f"dest {dest} must lie outside the dataset {out_dir} (and not contain it)")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"dest {dest} exists and is not empty")
    source, target = OutLayout(out_dir), OutLayout(dest)
    manifest_path = source.manifest
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {layout.MANIFEST} in {out_dir}")
    if report is None:
        report = load_report(out_dir)

    table = read_table(manifest_path)
    dropped = identities_to_drop(report, drop_collisions=drop_collisions, drop_leaks=drop_leaks)
    known = set(table.column("identity").unique().to_pylist())
    unknown = sorted(set(dropped) - known)
    if unknown:
        raise ValueError(
            f"the report names identities absent from {manifest_path} (e.g. {unknown[0]!r}): "
            "was it built for another dataset?"
        )
    keep_mask = pc.invert(
        pc.is_in(table.column("identity"), pa.array(sorted(dropped), pa.string()))
    )
    kept_rows = np.flatnonzero(keep_mask.to_numpy(zero_copy_only=False))
    kept = table.take(pa.array(kept_rows))
    logger.info(
        "pruning %d identit(ies): %d of %d images kept", len(dropped), len(kept_rows), len(table)
    )
    fsio.make_dirs(dest)
    if keys_only:
        keys = kept.column("key").to_pylist()
        fsio.atomic_write_bytes(
            dest / layout.KEPT_KEYS, "".join(f"{key}\n" for key in keys).encode("utf-8")
        )
        return kept

    kept, labels = assign_labels(kept)
    for relative in kept.column("path").to_pylist():
        fsio.copy_file(out_dir / relative, dest / relative, link=link)
    for embeddings, copy in ((source.outputs, target.outputs), (source.targets, target.targets)):
        if embeddings.is_file():
            _write_rows(embeddings, copy, kept_rows, block)
    write_labels(target.labels, labels)
    if source.config.is_file():
        fsio.copy_file(source.config, target.config, link=False)
    for side_path, copy in ((source.rejected, target.rejected), (source.errors, target.errors)):
        if not side_path.is_file():
            continue
        side = read_table(side_path)
        if "identity" in side.column_names and side.num_rows:
            side = side.filter(
                pc.invert(pc.is_in(side.column("identity"), pa.array(sorted(dropped), pa.string())))
            )
        write_parquet(copy, side)
    prune_record = (
        json.dumps(
            {
                "dropped": [
                    {"identity": name, "reason": reason} for name, reason in sorted(dropped.items())
                ],
                "images_kept": len(kept_rows),
                "images_dropped": len(table) - len(kept_rows),
                "identities_kept": len(labels),
            },
            indent=1,
        )
        + "\n"
    )
    fsio.atomic_write_bytes(dest / layout.PRUNE_JSON, prune_record.encode("utf-8"))
    # the manifest last: a dataset with manifest.parquet is a finished dataset
    write_parquet(target.manifest, kept)
    return kept


def prune_dataset(
    out: Path,
    dest: Path,
    drop_collisions: bool,
    drop_leaks: bool,
    keys_only: bool,
    copy: bool = False,
) -> str:
    """``digi2real prune``: a cleaned copy (or kept keys), formats and card rebuilt there."""
    from digi2real.analysis.card import write_card
    from digi2real.analysis.report import build_report
    from digi2real.config import read_yaml
    from digi2real.data.writers.assemble import assemble_formats

    if not OutLayout(out).report_json.is_file():
        build_report(out)  # the drop lists come from the report's figures
    table = prune(
        out,
        dest,
        drop_collisions=drop_collisions,
        drop_leaks=drop_leaks,
        keys_only=keys_only,
        link=not copy,
    )
    if keys_only:
        return f"{table.num_rows} kept keys -> {Path(dest) / layout.KEPT_KEYS}"
    record = read_yaml(OutLayout(dest).config)
    assemble_formats(Path(dest), record["config"]["output"]["formats"], table)
    write_card(Path(dest))
    identities = len(set(table.column("identity").to_pylist()))
    return f"kept {table.num_rows} images of {identities} identities -> {dest}"
