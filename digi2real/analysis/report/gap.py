"""The report's domain gap: did the conversion move the data toward real faces?

Three populations are compared, each streamed once (:mod:`digi2real.analysis.domain_gap`):
the gallery of real faces, the source renders and the outputs. In the recognizer's space the
sources are the conversion's cached embeddings (``.digi2real/cache/shard-*.parquet``; a shard
whose cache is gone is embedded again from the source root when the weights are at hand) and
the outputs are the run's ``outputs.npy``. In an image encoder's space (``--features``) every
image is embedded (aligned by the weights' detector first where it is not a crop already), and
each population's summary (moments and sample) is cached in ``OUT/report/`` keyed by the
model's checksum, its preprocessing and the list of images, so a second report reads it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real.analysis import domain_gap as dg
from digi2real.analysis.report.dataset import Dataset, source_root
from digi2real.data import fsio, layout
from digi2real.data.embeddings import EmbeddingSet
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import read_table

if TYPE_CHECKING:
    from digi2real.analysis.report.judge import OnnxImages
    from digi2real.face import FaceStack

logger = logging.getLogger(__name__)

GAP_SEED = 0
ROLES = ("gallery", "sources", "outputs")
# Per-shard re-embedding: the paths of a shard's renders -> their (n, D) embeddings.
ShardEmbedder = Callable[[list[Path]], Iterator[np.ndarray]]


@dataclass
class Sources:
    """The source renders the conversion embedded: per planned shard its usable paths
    (relative to the source root) and, where the cache still holds them, the embeddings."""

    root: Path | None
    shards: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # shards without a cache
    plan_files: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, dataset: Dataset) -> Sources:
        out = OutLayout(dataset.out_dir)
        sources = cls(source_root(dataset.out_dir, dataset.config))
        if not out.plan.is_file():
            return sources
        plan = read_table(out.plan, columns=["shard", "files"]).to_pylist()
        for row in plan:
            sources.plan_files.setdefault(int(row["shard"]), []).extend(row["files"])
        sources.shards = sorted(sources.plan_files)
        sources.missing = [s for s in sources.shards if not out.cache(s).is_file()]
        return sources

    def cached(self, out: OutLayout, shard: int) -> tuple[list[str], np.ndarray]:
        """A shard's usable render paths and their embeddings, from its cache."""
        import pyarrow.compute as pc

        table = read_table(out.cache(shard), columns=["path", "embedding"])
        table = table.filter(pc.is_valid(table.column("embedding")))
        if table.num_rows == 0:
            return [], np.zeros((0, 0), np.float32)
        values = table.column("embedding").combine_chunks().flatten().to_numpy()
        rows = values.reshape(table.num_rows, -1).astype(np.float32)
        return table.column("path").to_pylist(), rows

    def paths(self, out: OutLayout) -> Iterator[str]:
        """Every render the report treats as a source, in shard order."""
        for shard in self.shards:
            if shard in self.missing:
                yield from self.plan_files[shard]
            else:
                yield from self.cached(out, shard)[0]


def recognizer_source_blocks(
    dataset: Dataset, sources: Sources, reembed: ShardEmbedder | None, note: dict[str, Any]
) -> Iterator[np.ndarray]:
    """The sources' recognizer embeddings, shard by shard: the cache, or ``reembed`` of a
    shard's renders where its cache is gone (counted in ``note``)."""
    out = OutLayout(dataset.out_dir)
    for shard in sources.shards:
        if shard not in sources.missing:
            rows = sources.cached(out, shard)[1]
            if len(rows):
                yield rows
        elif reembed is not None and sources.root is not None:
            note["reembedded_shards"] += 1
            yield from reembed([sources.root / f for f in sources.plan_files[shard]])
        else:
            note["missing_shards"] += 1


# ---------------------------------------------------------------------------- summaries


def _digest(items: Iterable[str]) -> str:
    hasher = hashlib.sha256()
    for item in items:
        hasher.update(item.encode("utf-8") + b"\0")
    return hasher.hexdigest()


def _population_bytes(population: dg.Population, key: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        key=np.array(json.dumps(key, sort_keys=True)),
        count=np.array(population.moments.count, np.int64),
        mean=population.moments.mean,
        scatter=population.moments.scatter,
        sample=population.sample,
    )
    return buffer.getvalue()


def cached_population(
    path: Path, name: str, key: dict[str, Any], blocks: Callable[[], Iterable[np.ndarray]]
) -> tuple[dg.Population, bool]:
    """The summary stored at ``path`` if it was made with ``key``, else ``blocks()``
    summarised and stored there; and whether it was read back."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(str(stored["key"])) == key:
                moments = dg.Moments(int(stored["count"]), stored["mean"], stored["scatter"])
                logger.info("%s: features read back from %s", name, path.name)
                return dg.Population(name, moments, stored["sample"]), True
    population = dg.summarize(name, blocks(), pool=key["pool"], seed=key["seed"])
    fsio.atomic_write_bytes(path, _population_bytes(population, key))
    return population, False


# ---------------------------------------------------------------------------- figures


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    # 6 significant digits: report.json stays byte-stable across BLAS thread counts
    return {
        k: float(f"{v:.6g}") if isinstance(v, float) and np.isfinite(v) else v
        for k, v in figures.items()
    }


def gap_section(
    gallery: dg.Population,
    sources: dg.Population | None,
    outputs: dg.Population,
    *,
    kid_subsets: int,
    kid_subset_size: int,
    seed: int,
) -> dict[str, Any]:
    """The figures of one space: each population against the gallery, and the gap closed."""
    options = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "seed": seed}
    section: dict[str, Any] = {
        "gallery": {"count": gallery.count},
        "sources": None,
        "outputs": _rounded(dg.gap_figures(gallery, outputs, **options)),
        "gap_closed": None,
        "dim": gallery.moments.dim,
        "seed": seed,
    }
    if sources is not None:
        section["sources"] = _rounded(dg.gap_figures(gallery, sources, **options))
        section["gap_closed"] = _rounded(
            {
                "fd": dg.gap_closed(section["sources"]["fd"], section["outputs"]["fd"]),
                "kid": dg.gap_closed(section["sources"]["kid"], section["outputs"]["kid"]),
            }
        )
    return section


@dataclass
class GapOptions:
    kid_subsets: int = dg.DEFAULT_KID_SUBSETS
    kid_subset_size: int = dg.DEFAULT_KID_SUBSET_SIZE
    pool: int = dg.DEFAULT_POOL
    seed: int = GAP_SEED
    block: int = 65536


def recognizer_gap(
    dataset: Dataset,
    outputs: np.ndarray,
    gallery: EmbeddingSet,
    gallery_name: str,
    picture: Path,
    *,
    reembed: ShardEmbedder | None = None,
    options: GapOptions | None = None,
) -> dict[str, Any]:
    """The domain gap in the run's recognizer space (``outputs`` are the run's own embeddings,
    the space the sources were cached in)."""
    from digi2real.analysis.report.pictures import plot_domain_gap

    options = options or GapOptions()
    width = outputs.shape[1]
    if gallery.embeddings.shape[1] != width:
        return {
            "gallery_name": gallery_name,
            "skipped": (
                f"the gallery is {gallery.embeddings.shape[1]}-d, the run's embeddings "
                f"{width}-d: embed the gallery with the weights' recognizer"
            ),
        }
    summarize = _summarizer(options)
    real = summarize("gallery", dg.array_blocks(gallery.embeddings, options.block))
    generated = summarize("outputs", dg.array_blocks(outputs, options.block))
    sources = Sources.of(dataset)
    note = {"missing_shards": 0, "reembedded_shards": 0}
    renders = None
    if sources.shards:
        try:
            renders = summarize(
                "sources", recognizer_source_blocks(dataset, sources, reembed, note)
            )
        except ValueError as error:  # no cache and no way to embed: no sources
            logger.warning("domain gap without the sources: %s", error)
    section = gap_section(
        real,
        renders,
        generated,
        kid_subsets=options.kid_subsets,
        kid_subset_size=options.kid_subset_size,
        seed=options.seed,
    )
    section.update(gallery_name=gallery_name, shards=len(sources.shards), **note)
    section["png"] = plot_domain_gap(real, renders, generated, picture, space="recognizer").name
    return section


def _summarizer(options: GapOptions) -> Callable[[str, Iterable[np.ndarray]], dg.Population]:
    def summarize(name: str, blocks: Iterable[np.ndarray]) -> dg.Population:
        return dg.summarize(name, blocks, pool=options.pool, seed=options.seed)

    return summarize


def features_gap(
    dataset: Dataset,
    encoder: OnnxImages,
    gallery: Path,
    faces: FaceStack | None,
    report_dir: Path,
    *,
    options: GapOptions | None = None,
) -> dict[str, Any]:
    """The domain gap in an image encoder's space. The outputs are crops already; the gallery
    folder and the source renders are aligned by ``faces`` (the weights' detector) first."""
    from digi2real.analysis.report.judge import embedded_blocks
    from digi2real.analysis.report.pictures import plot_domain_gap
    from digi2real.data.readers import image_files
    from digi2real.weights import sha256_file

    options = options or GapOptions()
    section: dict[str, Any] = {
        "model": encoder.path.name,
        "model_sha256": sha256_file(encoder.path),
        "preprocessing": {
            "input_size": encoder.spec.input_size,
            "color": encoder.spec.color,
            "mean": list(encoder.spec.mean),
            "std": list(encoder.spec.std),
        },
        "gallery_name": gallery.name,
    }
    if not gallery.is_dir():
        section["skipped"] = "the gallery is not a folder of images: nothing to embed"
        return section
    if faces is None:
        section["skipped"] = "the gallery and sources need aligning: pass --weights DIR"
        return section
    out = OutLayout(dataset.out_dir)
    base = {
        **{k: section[k] for k in ("model_sha256", "preprocessing")},
        "pool": options.pool,
        "seed": options.seed,
    }
    gallery_files = image_files(gallery)
    sources = Sources.of(dataset)
    root = sources.root
    # renders whose folder is gone cannot be seen by an encoder: the sources are then left out
    source_paths = list(sources.paths(out)) if root is not None and root.is_dir() else []
    if not source_paths:
        section["sources_note"] = f"source renders not found (source root {root})"

    def output_blocks() -> Iterator[np.ndarray]:
        for start in range(0, len(dataset.paths), 256):
            yield encoder([dataset.out_dir / p for p in dataset.paths[start : start + 256]])

    listing = [
        f"{p.relative_to(gallery)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in gallery_files
    ]
    plans: dict[str, tuple[list[str], Callable[[], Iterable[np.ndarray]]]] = {
        "gallery": (listing, lambda: embedded_blocks(faces, gallery_files, encoder.embed_crops)),
        "outputs": (dataset.paths, output_blocks),
    }
    if source_paths:
        plans["sources"] = (
            source_paths,
            lambda: embedded_blocks(faces, [root / p for p in source_paths], encoder.embed_crops),
        )
    populations: dict[str, dg.Population] = {}
    reused = []
    for role, (items, blocks) in plans.items():
        key = {**base, "role": role, "items": _digest(items)}
        path = report_dir / layout.feature_summary_name(role)
        populations[role], read_back = cached_population(path, role, key, blocks)
        if read_back:
            reused.append(role)
    section.update(
        gap_section(
            populations["gallery"],
            populations.get("sources"),
            populations["outputs"],
            kid_subsets=options.kid_subsets,
            kid_subset_size=options.kid_subset_size,
            seed=options.seed,
        )
    )
    section["cached"] = reused
    section["png"] = plot_domain_gap(
        populations["gallery"],
        populations.get("sources"),
        populations["outputs"],
        report_dir / layout.REPORT_DOMAIN_GAP_FEATURES,
        space=f"{encoder.path.name} features",
    ).name
    return section
