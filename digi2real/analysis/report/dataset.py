"""Reading a converted dataset's ``OUT/`` for the report: the manifest, the row-aligned
embedding arrays (memory-mapped), the run's config and a leakage gallery."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.data import layout
from digi2real.data.embeddings import EmbeddingSet, load_embeddings, read_embedding_array
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import parquet_rows, read_table
from digi2real.data.store import is_url, location

logger = logging.getLogger(__name__)

GalleryEmbedder = Callable[[Path], EmbeddingSet]


@dataclass
class Dataset:
    out_dir: Any  # Path, or an ObjectPath for an OUT on a store
    keys: list[str]
    paths: list[str]
    codes: np.ndarray  # (N,) contiguous codes over the manifest's labels
    labels: list[int]  # code -> dataset label
    identities: list[str]  # code -> identity name
    outputs: np.ndarray
    targets: np.ndarray
    config: dict[str, Any]
    manifest_path: Path
    weights_profile: str | None = None  # "tiny": random weights, the images are noise


# the sections runner/finalize writes into config.yaml: each a mapping, or null
RECORD_SECTIONS = ("config", "weights", "shift", "lora", "environment", "attributes")


def read_run_config(out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the full config, the whole config.yaml record) of a converted dataset; both empty
    when it has no config.yaml. A file that is not such a record (not YAML, not a mapping, an
    unknown section, a config field of the wrong type or unknown) is one ValueError naming
    it."""
    from digi2real.config import read_yaml

    path = OutLayout(out_dir).config
    if not path.is_file():
        logger.warning("%s not found: source renders will not be shown", path)
        return {}, {}
    record = read_yaml(path)
    return _checked_record(record, path)


def _checked_record(record: Any, path: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from digi2real.config import (
        HOST_PATH_FIELDS,
        PLACEMENT_FIELDS,
        Config,
        ConfigError,
        merge_environment,
    )

    if record is None:
        raise ValueError(f"{path} is empty: it should hold the run's config and environment")
    if not isinstance(record, dict):
        raise ValueError(f"{path}: must be a mapping of sections, got {type(record).__name__}")
    for section in RECORD_SECTIONS:
        _mapping(record.get(section), path, section)
    if not isinstance((record.get("weights") or {}).get("profile"), str | None):
        raise ValueError(f"{path}: weights.profile must be text")
    if "config" not in record:
        # a bare config (hand-made OUTs; no digi2real wrote one): what the report reads of it
        source = _mapping(record.get("source"), path, "source")
        if not isinstance(source.get("root"), str | None):
            raise ValueError(f"{path}: source.root must be text")
        return record, record
    unknown = sorted(str(key) for key in record if key not in RECORD_SECTIONS)
    if unknown:
        raise ValueError(
            f"{path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(RECORD_SECTIONS)}"
        )
    _mapping(record["config"], path, "config", required=True)
    environment = record.get("environment") or {}
    for group, names in (("placement", PLACEMENT_FIELDS), ("paths", HOST_PATH_FIELDS)):
        fields = _mapping(environment.get(group), path, f"environment.{group}")
        stray = sorted(str(key) for key in fields if key not in names)
        if stray:
            raise ValueError(
                f"{path}: environment.{group} holds unknown field(s) {', '.join(stray)}"
            )
    config = merge_environment(record)
    try:
        Config.from_dict(config, where=str(path))
    except ConfigError as error:
        raise ValueError("; ".join(error.problems)) from None
    return config, record


def _mapping(value: Any, path: Any, section: str, *, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {section} must be a mapping, got {type(value).__name__}")
    return value


def open_dataset(out_dir: str | Path) -> Dataset:
    """Read what the report needs from OUT: the manifest and the memory-mapped arrays."""

    out = OutLayout(out_dir)
    out_dir = out.root
    manifest_path = out.manifest
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {layout.MANIFEST} in {out_dir}: is it a converted dataset?")
    table = read_table(manifest_path, columns=["key", "identity", "label", "path"])
    if table.num_rows == 0:
        raise ValueError(f"{manifest_path} has no rows: nothing to report on")
    # through Python lists: pyarrow's to_numpy imports pandas (half a second of start-up)
    raw_labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    unique_labels, codes = np.unique(raw_labels, return_inverse=True)
    names_per_row = np.asarray(table.column("identity").to_pylist(), dtype=object)
    # One identity per label: name each label by its first row, then check all rows agree.
    sorted_rows = np.argsort(raw_labels, kind="stable")
    sorted_labels = raw_labels[sorted_rows]
    first_rows = sorted_rows[np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]]
    identities = [str(name) for name in names_per_row[first_rows]]
    mismatch = np.flatnonzero(names_per_row != np.asarray(identities, dtype=object)[codes])
    if mismatch.size:
        row = int(mismatch[0])
        raise ValueError(
            f"{manifest_path}: label {raw_labels[row]} is used by more than one identity "
            f"({names_per_row[row]!r} and {identities[codes[row]]!r})"
        )
    arrays = []
    for path in (out.outputs, out.targets):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the report needs the run's embeddings")
        array = read_embedding_array(path, mmap=True)
        metrics.check_float32(array, str(path))
        if array.shape[0] != table.num_rows:
            raise ValueError(f"{path} has {array.shape[0]} rows for {table.num_rows} manifest rows")
        arrays.append(array)
    config, record = read_run_config(out_dir)
    return Dataset(
        out_dir=out_dir,
        keys=table.column("key").to_pylist(),
        paths=table.column("path").to_pylist(),
        codes=codes.astype(np.int64),
        labels=[int(v) for v in unique_labels],
        identities=identities,
        outputs=arrays[0],
        targets=arrays[1],
        config=config,
        manifest_path=manifest_path,
        weights_profile=(record.get("weights") or {}).get("profile"),
    )


def load_gallery(gallery: Any, gallery_embedder: GalleryEmbedder | None) -> EmbeddingSet:
    gallery = location(gallery)
    if gallery.is_dir():
        if gallery_embedder is None:
            raise ValueError(
                f"gallery {gallery} is a folder of images: pass gallery_embedder, or a .npy "
                "embedding file written by `digi2real embed`"
            )
        embedded = gallery_embedder(gallery)
        if not isinstance(embedded, EmbeddingSet):
            raise ValueError(
                f"gallery_embedder returned {type(embedded).__name__}, not EmbeddingSet"
            )
        return embedded
    if gallery.suffix == ".npy":
        return load_embeddings(gallery, mmap=True)
    if not gallery.exists():
        raise FileNotFoundError(f"gallery not found: {gallery}")
    raise ValueError(f"gallery must be a .npy embedding file or a folder of images, got {gallery}")


def count_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    return parquet_rows(path)


def source_root(out_dir: Any, config: dict[str, Any]) -> Any:
    root = (config.get("source") or {}).get("root")
    if not root:
        return None
    if is_url(root):
        return location(root)
    root = Path(root)
    return root if root.is_absolute() else out_dir / root
