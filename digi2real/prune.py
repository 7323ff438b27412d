"""A cleaned copy of a converted dataset without colliding or leaking identities.

The original OUT is never written to. ``prune`` copies (or hard-links) the kept images,
filters the manifest and the row-aligned embedding arrays, renumbers labels contiguously
over the sorted remaining identity names and rewrites ``labels.csv``. Of two colliding
identities the one with the LOWER label stays. The returned manifest table is the hook for
re-assembling the shard formats (WebDataset, RecordIO) in the copy.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real import filter as idfilter
from digi2real.report import OUTPUTS_NPY, STATE_DIR, TARGETS_NPY, load_report

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

KEPT_KEYS = "kept_keys.txt"
PRUNE_JSON = "prune.json"


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


def _copy_file(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem or no hard links there: fall back to a copy
    shutil.copy2(source, target)


def _write_rows(source: Path, target: Path, rows: np.ndarray, block: int) -> None:
    """Write ``source[rows]`` as a new .npy, streamed in blocks (never the whole array)."""
    array = np.load(source, mmap_mode="r", allow_pickle=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
    header["shape"] = (len(rows), *array.shape[1:])
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, len(rows), block):
            handle.write(idfilter.read_block(array, rows[start : start + block]).tobytes())
    tmp.replace(target)


def _relabel_key(key: str, old_label: int, new_label: int) -> str:
    # WebDataset-style keys carry the label ({label:07d}_{k:04d}); other keys are kept.
    prefix = f"{old_label:07d}_"
    return f"{new_label:07d}_{key[len(prefix) :]}" if key.startswith(prefix) else key


def prune(
    out_dir: str | Path,
    dest: str | Path,
    *,
    drop_collisions: bool,
    drop_leaks: bool,
    report: dict[str, Any] | None = None,
    keys_only: bool = False,
    link: bool = True,
    block: int = idfilter.DEFAULT_BLOCK,
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
    import pyarrow.parquet as pq

    out_dir = Path(out_dir).resolve()
    dest = Path(dest).resolve()
    if not drop_collisions and not drop_leaks:
        raise ValueError("nothing to prune: set drop_collisions and/or drop_leaks")
    if dest == out_dir or out_dir in dest.parents or dest in out_dir.parents:
        raise ValueError(f"dest {dest} must lie outside the dataset {out_dir} (and not contain it)")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"dest {dest} exists and is not empty")
    manifest_path = out_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.parquet in {out_dir}")
    if report is None:
        report = load_report(out_dir)

    table = pq.read_table(manifest_path)
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
    dest.mkdir(parents=True, exist_ok=True)
    if keys_only:
        keys = kept.column("key").to_pylist()
        (dest / KEPT_KEYS).write_text("".join(f"{key}\n" for key in keys), encoding="utf-8")
        return kept

    names = sorted(set(kept.column("identity").to_pylist()))
    new_label = {name: label for label, name in enumerate(names)}
    old_labels = kept.column("label").to_pylist()
    identities = kept.column("identity").to_pylist()
    labels = [new_label[name] for name in identities]
    keys = [
        _relabel_key(key, old, new)
        for key, old, new in zip(kept.column("key").to_pylist(), old_labels, labels, strict=True)
    ]
    kept = kept.set_column(
        kept.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())
    )
    kept = kept.set_column(kept.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))

    for relative in kept.column("path").to_pylist():
        _copy_file(out_dir / relative, dest / relative, link)
    for name in (OUTPUTS_NPY, TARGETS_NPY):
        source = out_dir / STATE_DIR / name
        if source.is_file():
            _write_rows(source, dest / STATE_DIR / name, kept_rows, block)
    pq.write_table(kept, dest / "manifest.parquet")
    with (dest / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["label", "identity"])
        writer.writerows((label, name) for name, label in new_label.items())
    if (out_dir / "config.yaml").is_file():
        shutil.copy2(out_dir / "config.yaml", dest / "config.yaml")
    for name in ("rejected.parquet", "errors.parquet"):
        source = out_dir / name
        if not source.is_file():
            continue
        side = pq.read_table(source)
        if "identity" in side.column_names and side.num_rows:
            side = side.filter(
                pc.invert(pc.is_in(side.column("identity"), pa.array(sorted(dropped), pa.string())))
            )
        pq.write_table(side, dest / name)
    (dest / PRUNE_JSON).write_text(
        json.dumps(
            {
                "dropped": [
                    {"identity": name, "reason": reason} for name, reason in sorted(dropped.items())
                ],
                "images_kept": len(kept_rows),
                "images_dropped": len(table) - len(kept_rows),
                "identities_kept": len(names),
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return kept
