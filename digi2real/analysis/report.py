"""The dataset report: consistency, separation, leakage, diversity, pictures and HTML.

``build_report(OUT)`` reads a converted dataset (manifest + the row-aligned output/target
embedding arrays, memory-mapped) and writes ``OUT/report/``:

- ``report.json``: every figure (below), deterministic (no timestamps, rounded floats);
- ``similarity_hist.png``: image-to-own-centroid (intra) vs centroid-to-nearest-other
  (inter) cosine, plus output-to-target;
- ``contact_NNN.png``: per identity its source render(s) beside its realistic outputs;
- ``index.html`` (``html=True``): a page over all of it that opens from the folder.

Figures: *consistency* (each image's cosine to its identity centroid and to its own
target, per identity and over identities), *separation* (nearest other identity per
identity and the identity pairs whose centroids collide), *leakage* (generated
identities matching a gallery of real identities), *diversity* (mean pairwise cosine
distance per identity and near-duplicate images within an identity) and counts.

``source_report`` runs the separation check on a source dataset's embeddings before any
generation: near-duplicate source identities would become label noise.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.config import Config
from digi2real.data.embeddings import EmbeddingSet, load_embeddings
from digi2real.data.layout import OutLayout

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_JSON = "report.json"
HIST_PNG = "similarity_hist.png"
INDEX_HTML = "index.html"
STATE_DIR = ".digi2real"
OUTPUTS_NPY = "outputs.npy"
TARGETS_NPY = "targets.npy"
REPORT_FORMAT = 1

# Centroids average the noise away, so distinct identities sit far lower than genuine
# image pairs; 0.6 between centroids is already the same person for ArcFace R100.
DEFAULT_COLLISION_THRESHOLD = 0.6
# An image or centroid at 0.5 to a real identity's centroid is a verification match.
DEFAULT_LEAK_THRESHOLD = 0.5
DEFAULT_DUPLICATE_THRESHOLD = 0.95
HIST_BINS = 200

GalleryEmbedder = Callable[[Path], EmbeddingSet]


# ---------------------------------------------------------------------------- figures


def _round(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def distribution(values: np.ndarray) -> dict[str, float | int | None]:
    """Summary of a 1-d sample (NaN dropped): count, mean, std, min, percentiles, max."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"count": 0}
    points = np.percentile(values, [0, 1, 5, 25, 50, 75, 95, 99, 100])
    names = ("min", "p01", "p05", "p25", "median", "p75", "p95", "p99", "max")
    out: dict[str, float | int | None] = {
        "count": int(values.size),
        "mean": _round(values.mean()),
        "std": _round(values.std()),
    }
    out.update({name: _round(point) for name, point in zip(names, points, strict=True)})
    return out


def _check_threshold(name: str, value: float) -> float:
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {value}")
    return float(value)


@dataclass
class Figures:
    """The report's numbers plus the per-row arrays the pictures are drawn from."""

    figures: dict[str, Any]
    intra: np.ndarray  # (N,) image vs own centroid
    to_target: np.ndarray  # (N,) image vs its target
    inter: np.ndarray  # (K,) centroid vs nearest other centroid
    centroids: np.ndarray  # (K, D)


def _per_identity(
    values: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and min of a per-row value per identity (rows grouped by ``order``)."""
    ordered = values[order].astype(np.float64)
    return np.add.reduceat(ordered, starts) / counts, np.minimum.reduceat(ordered, starts)


def compute_figures(
    outputs: np.ndarray,
    targets: np.ndarray,
    codes: np.ndarray,
    identities: Sequence[str],
    *,
    labels: Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    collision_threshold: float = DEFAULT_COLLISION_THRESHOLD,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    block: int = metrics.DEFAULT_BLOCK,
) -> Figures:
    """Consistency, separation, diversity and histogram figures from the embedding arrays.

    ``codes`` are contiguous identity codes ``0..K-1`` per row, ``identities[code]`` the
    names and ``labels[code]`` the dataset's labels (default: the codes). Streams the
    (possibly memory-mapped) arrays in blocks of ``block`` rows.
    """
    collision_threshold = _check_threshold("collision_threshold", collision_threshold)
    duplicate_threshold = _check_threshold("duplicate_threshold", duplicate_threshold)
    outputs = metrics.check_float32(outputs, "outputs")
    targets = metrics.check_float32(targets, "targets")
    if outputs.shape != targets.shape:
        raise ValueError(f"outputs {outputs.shape} and targets {targets.shape} are not row-aligned")
    codes = metrics.check_labels(codes, outputs.shape[0], "codes")
    num_identities = len(identities)
    labels = list(range(num_identities)) if labels is None else [int(v) for v in labels]
    if len(labels) != num_identities:
        raise ValueError(f"{len(labels)} labels for {num_identities} identities")

    sums, counts = metrics.identity_sums(outputs, codes, num_identities=num_identities, block=block)
    centroids = metrics.centroids_from_sums(sums, counts)
    diversity = metrics.mean_pairwise_distance(sums, counts)
    del sums
    logger.info("centroids of %d identities over %d images", num_identities, outputs.shape[0])
    intra = metrics.row_to_centroid(outputs, codes, centroids, block=block)
    to_target = metrics.rowwise_cosine(outputs, targets, block=block)

    nearest_scores, nearest_index = metrics.nearest_other(centroids, k=1)
    nearest_scores, nearest_index = nearest_scores[:, 0], nearest_index[:, 0]
    collisions = metrics.collision_pairs(
        centroids, collision_threshold, nearest_scores=nearest_scores
    )
    duplicates = metrics.near_duplicates(outputs, codes, duplicate_threshold, block=block)
    logger.info("%d collision pair(s), %d near duplicate(s)", len(collisions), len(duplicates))

    order = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    mean_centroid, min_centroid = _per_identity(intra, order, starts, counts)
    mean_target, min_target = _per_identity(to_target, order, starts, counts)
    del order

    def key_of(row: int) -> str | int:
        return keys[row] if keys is not None else row

    inter = nearest_scores[np.isfinite(nearest_scores)]
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    figures: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "counts": {
            "images": int(outputs.shape[0]),
            "identities": num_identities,
            "images_per_identity": distribution(counts),
        },
        "thresholds": {"collision": collision_threshold, "near_duplicate": duplicate_threshold},
        "consistency": {
            "image_to_centroid": distribution(intra),
            "image_to_target": distribution(to_target),
            "identity_mean_to_centroid": distribution(mean_centroid),
            "identity_min_to_centroid": distribution(min_centroid),
            "identity_mean_to_target": distribution(mean_target),
            "identity_min_to_target": distribution(min_target),
        },
        "separation": {
            "nearest_other": distribution(inter),
            "num_collisions": len(collisions),
            "collisions": [
                {
                    "a": identities[i],
                    "label_a": labels[i],
                    "b": identities[j],
                    "label_b": labels[j],
                    "score": _round(score),
                }
                for i, j, score in collisions
            ],
        },
        "diversity": {
            "mean_pairwise_distance": distribution(diversity),
            "num_near_duplicates": len(duplicates),
            "near_duplicates": [
                {
                    "identity": identities[codes[i]],
                    "label": labels[codes[i]],
                    "a": key_of(i),
                    "b": key_of(j),
                    "score": _round(score),
                }
                for i, j, score in duplicates
            ],
        },
        "histogram": {
            "edges": [_round(edge) for edge in edges],
            "intra": np.histogram(intra, edges)[0].tolist(),
            "inter": np.histogram(inter, edges)[0].tolist(),
            "target": np.histogram(to_target, edges)[0].tolist(),
        },
        "identities": [
            {
                "identity": identities[code],
                "label": labels[code],
                "images": int(counts[code]),
                "mean_to_centroid": _round(mean_centroid[code]),
                "min_to_centroid": _round(min_centroid[code]),
                "mean_to_target": _round(mean_target[code]),
                "min_to_target": _round(min_target[code]),
                "nearest": identities[nearest_index[code]] if nearest_index[code] >= 0 else None,
                "nearest_score": _round(nearest_scores[code]),
                "diversity": _round(diversity[code]),
            }
            for code in range(num_identities)
        ],
    }
    return Figures(figures, intra, to_target, nearest_scores, centroids)


def leakage_figures(
    outputs: np.ndarray,
    codes: np.ndarray,
    identities: Sequence[str],
    gallery: EmbeddingSet,
    threshold: float,
    *,
    labels: Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    centroids: np.ndarray | None = None,
    gallery_name: str | None = None,
    block: int = metrics.DEFAULT_BLOCK,
) -> dict[str, Any]:
    threshold = _check_threshold("leak_threshold", threshold)
    labels = list(range(len(identities))) if labels is None else list(labels)
    if gallery.identities is None:
        gallery_codes = None
        gallery_names = [f"row {row}" for row in range(gallery.embeddings.shape[0])]
    else:
        gallery_codes, gallery_names = metrics.encode_labels(gallery.identities)
    leaks = metrics.leakage(
        outputs,
        codes,
        metrics.check_float32(gallery.embeddings, "gallery embeddings"),
        gallery_codes,
        threshold,
        gen_centroids=centroids,
        block=block,
    )
    logger.info("%d generated identit(ies) leak into the gallery", len(leaks))
    return {
        "gallery": gallery_name,
        "gallery_identities": len(gallery_names),
        "gallery_images": int(gallery.embeddings.shape[0]),
        "threshold": threshold,
        "num_leaks": len(leaks),
        "leaks": [
            {
                "identity": identities[leak.label],
                "label": int(labels[leak.label]),
                "gallery_identity": gallery_names[leak.gallery_label],
                "score": _round(leak.score),
                "matched": list(leak.matched),
                "centroid_gallery_identity": gallery_names[leak.centroid_gallery_label],
                "centroid_score": _round(leak.centroid_score),
                "image_gallery_identity": gallery_names[leak.image_gallery_label],
                "image_score": _round(leak.image_score),
                "image": keys[leak.image_row] if keys is not None else leak.image_row,
            }
            for leak in leaks
        ],
    }


def source_report(
    embeddings: np.ndarray,
    identities: Sequence[str],
    threshold: float = DEFAULT_COLLISION_THRESHOLD,
    *,
    block: int = metrics.DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Separation check on a SOURCE dataset's embeddings (one identity name per row).

    Run before generation: source identities whose centroids collide would be generated as
    two labels of one face.
    """
    threshold = _check_threshold("threshold", threshold)
    embeddings = metrics.check_float32(embeddings)
    if len(identities) != embeddings.shape[0]:
        raise ValueError(f"{len(identities)} identity names for {embeddings.shape[0]} embeddings")
    codes, names = metrics.encode_labels(identities)
    centroids, counts = metrics.identity_centroids(
        embeddings, codes, num_identities=len(names), block=block
    )
    intra = metrics.row_to_centroid(embeddings, codes, centroids, block=block)
    nearest_scores, nearest_index = metrics.nearest_other(centroids, k=1)
    pairs = metrics.collision_pairs(centroids, threshold, nearest_scores=nearest_scores)
    return {
        "images": int(embeddings.shape[0]),
        "identities": len(names),
        "single_image_identities": int((counts == 1).sum()),
        "threshold": threshold,
        "image_to_centroid": distribution(intra),
        "nearest_other": distribution(nearest_scores[:, 0]),
        "num_collisions": len(pairs),
        "collisions": [
            {"a": names[i], "b": names[j], "score": _round(score)} for i, j, score in pairs
        ],
    }


# ---------------------------------------------------------------------------- reading OUT


@dataclass
class Dataset:
    out_dir: Path
    keys: list[str]
    paths: list[str]
    codes: np.ndarray  # (N,) contiguous codes over the manifest's labels
    labels: list[int]  # code -> dataset label
    identities: list[str]  # code -> identity name
    outputs: np.ndarray
    targets: np.ndarray
    config: dict[str, Any]
    manifest_path: Path


def _read_config(out_dir: Path) -> dict[str, Any]:
    import yaml

    path = out_dir / "config.yaml"
    if not path.is_file():
        logger.warning("%s not found: source renders will not be shown", path)
        return {}
    with path.open(encoding="utf-8") as handle:
        record = yaml.safe_load(handle) or {}
    from digi2real.config import merge_environment

    # config.yaml keeps host paths (source root...) under its environment section
    return merge_environment(record) if "config" in record else record


def open_dataset(out_dir: str | Path) -> Dataset:
    """Read what the report needs from OUT: the manifest and the memory-mapped arrays."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.parquet"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.parquet in {out_dir}: is it a converted dataset?")
    table = pq.read_table(manifest_path, columns=["key", "identity", "label", "path"])
    if table.num_rows == 0:
        raise ValueError(f"{manifest_path} has no rows: nothing to report on")
    raw_labels = table.column("label").to_numpy().astype(np.int64)
    unique_labels, codes = np.unique(raw_labels, return_inverse=True)
    names_per_row = table.column("identity").to_numpy(zero_copy_only=False)
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
    state = out_dir / STATE_DIR
    arrays = []
    for name in (OUTPUTS_NPY, TARGETS_NPY):
        path = state / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the report needs the run's embeddings")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        metrics.check_float32(array, str(path))
        if array.shape[0] != table.num_rows:
            raise ValueError(f"{path} has {array.shape[0]} rows for {table.num_rows} manifest rows")
        arrays.append(array)
    return Dataset(
        out_dir=out_dir,
        keys=table.column("key").to_pylist(),
        paths=table.column("path").to_pylist(),
        codes=codes.astype(np.int64),
        labels=[int(v) for v in unique_labels],
        identities=identities,
        outputs=arrays[0],
        targets=arrays[1],
        config=_read_config(out_dir),
        manifest_path=manifest_path,
    )


def load_gallery(gallery: Path, gallery_embedder: GalleryEmbedder | None) -> EmbeddingSet:
    gallery = Path(gallery)
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


def _count_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def _source_root(out_dir: Path, config: dict[str, Any]) -> Path | None:
    root = (config.get("source") or {}).get("root")
    if not root:
        return None
    root = Path(root)
    return root if root.is_absolute() else out_dir / root


# ---------------------------------------------------------------------------- pictures


def plot_histogram(figures: Figures, path: Path, *, collision_threshold: float) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    series = (
        ("image vs own centroid (intra)", figures.intra, "tab:blue"),
        ("output vs its target", figures.to_target, "tab:green"),
        ("centroid vs nearest other (inter)", figures.inter[np.isfinite(figures.inter)], "tab:red"),
    )
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    lowest = 1.0
    for name, values, color in series:
        if values.size == 0:
            continue
        counts, _ = np.histogram(values, edges)
        density = counts / max(counts.sum(), 1) / (edges[1] - edges[0])
        axes.stairs(density, edges, label=f"{name} (n={values.size})", color=color, fill=False)
        lowest = min(lowest, float(np.min(values)))
    axes.axvline(collision_threshold, color="black", linestyle="--", linewidth=1)
    axes.text(collision_threshold, axes.get_ylim()[1] * 0.95, " collision", fontsize=8)
    axes.set_xlim(max(-1.0, math.floor(lowest * 10) / 10 - 0.05), 1.0)
    axes.set_xlabel("cosine similarity (ArcFace)")
    axes.set_ylabel("density")
    axes.set_title("Identity consistency vs separation")
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


TILE = 112
CAPTION = 14
LABEL_WIDTH = 190
GAP = 12


def _tile(path: Path | None, placeholder: str):
    from PIL import Image, ImageDraw

    if path is not None and path.is_file():
        try:
            with Image.open(path) as image:
                return image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
        except OSError as error:
            logger.warning("cannot read %s: %s", path, error)
    tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    ImageDraw.Draw(tile).text((6, TILE // 2 - 6), placeholder, fill=(90, 90, 90))
    return tile


@dataclass
class SheetRow:
    identity: str
    label: int
    note: str
    sources: list[Path | None]
    outputs: list[tuple[Path, float, float]]  # (image, to target, to centroid)


def draw_contact_sheet(rows: Sequence[SheetRow], path: Path, *, sources: int, images: int) -> Path:
    from PIL import Image, ImageDraw

    cell = TILE + CAPTION
    width = LABEL_WIDTH + sources * TILE + GAP + images * TILE
    sheet = Image.new("RGB", (width, CAPTION + len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 1), "identity", fill=(0, 0, 0))
    draw.text((LABEL_WIDTH, 1), "source", fill=(0, 0, 0))
    draw.text(
        (LABEL_WIDTH + sources * TILE + GAP, 1),
        "generated (t = cos to target, c = cos to centroid)",
        fill=(0, 0, 0),
    )
    for index, row in enumerate(rows):
        top = CAPTION + index * (cell + 4)
        draw.text((4, top + 4), row.identity[:30], fill=(0, 0, 0))
        draw.text((4, top + 20), f"label {row.label}", fill=(60, 60, 60))
        for line, text in enumerate(row.note.split("\n")):
            draw.text((4, top + 36 + 14 * line), text[:30], fill=(170, 0, 0))
        for column, source in enumerate(row.sources[:sources]):
            sheet.paste(_tile(source, "source missing"), (LABEL_WIDTH + column * TILE, top))
        left = LABEL_WIDTH + sources * TILE + GAP
        for column, (image, to_target, to_centroid) in enumerate(row.outputs[:images]):
            x = left + column * TILE
            sheet.paste(_tile(image, "image missing"), (x, top))
            draw.text(
                (x + 2, top + TILE + 1), f"t={to_target:.2f} c={to_centroid:.2f}", fill=(0, 0, 0)
            )
    sheet.save(path, format="PNG")
    return path


def _sheet_identities(figures: dict[str, Any], total: int, count: int) -> list[tuple[int, str]]:
    """Flagged identities first (collisions, leaks), then an even spread over all labels."""
    code_of = {row["label"]: code for code, row in enumerate(figures["identities"])}
    notes: dict[int, list[str]] = {}
    for pair in figures["separation"]["collisions"]:
        notes.setdefault(code_of[pair["label_a"]], []).append(f"~ {pair['b']} {pair['score']:.2f}")
        notes.setdefault(code_of[pair["label_b"]], []).append(f"~ {pair['a']} {pair['score']:.2f}")
    for leak in (figures.get("leakage") or {}).get("leaks", []):
        notes.setdefault(code_of[leak["label"]], []).append(
            f"leak {leak['gallery_identity']} {leak['score']:.2f}"
        )
    chosen = list(notes)[:count]
    if len(chosen) < count:
        spread = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
        chosen += [int(code) for code in spread if int(code) not in notes]
    return [(code, "\n".join(notes.get(code, []))) for code in chosen[:count]]


def contact_sheets(
    dataset: Dataset,
    figures: Figures,
    report_dir: Path,
    *,
    identities: int = 32,
    per_sheet: int = 8,
    sources: int = 2,
    images: int = 6,
) -> list[Path]:
    import pyarrow.parquet as pq

    chosen = _sheet_identities(figures.figures, len(dataset.identities), identities)
    root = _source_root(dataset.out_dir, dataset.config)
    if root is None or not root.is_dir():
        logger.warning("source root %s is gone: contact sheets show no source renders", root)
        root = None
    wanted = np.isin(dataset.codes, [code for code, _ in chosen])
    wanted_rows = np.flatnonzero(wanted)
    source_paths = pq.read_table(dataset.manifest_path, columns=["source_paths"]).column(
        "source_paths"
    )
    rows: list[SheetRow] = []
    for code, note in chosen:
        members = wanted_rows[dataset.codes[wanted_rows] == code]
        unique_sources: list[str] = []
        for row in members:
            for source in source_paths[int(row)].as_py() or []:
                if source not in unique_sources:
                    unique_sources.append(source)
        resolved = [root / source if root is not None else None for source in unique_sources]
        rows.append(
            SheetRow(
                identity=dataset.identities[code],
                label=dataset.labels[code],
                note=note,
                sources=resolved or [None],
                outputs=[
                    (
                        dataset.out_dir / dataset.paths[row],
                        float(figures.to_target[row]),
                        float(figures.intra[row]),
                    )
                    for row in members[:images]
                ],
            )
        )
    written = []
    for number, start in enumerate(range(0, len(rows), per_sheet)):
        path = report_dir / f"contact_{number:03d}.png"
        written.append(
            draw_contact_sheet(
                rows[start : start + per_sheet], path, sources=sources, images=images
            )
        )
    # A re-run with fewer sheets must not leave stale ones the HTML no longer lists.
    for stale in report_dir.glob("contact_*.png"):
        if stale not in written:
            stale.unlink()
    return written


# ---------------------------------------------------------------------------- HTML


def _image_src(path: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html_lib.escape(path.name)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html_lib.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _distribution_table(named: dict[str, dict[str, Any]]) -> str:
    columns = ("count", "mean", "min", "p05", "median", "p95", "max")
    return _table(
        ("figure", *columns),
        [
            (name, *(dist.get(c, "") for c in columns))
            for name, dist in named.items()
            if isinstance(dist, dict)  # skips figures a judge makes meaningless, and notes
        ],
    )


def write_html(report: dict[str, Any], report_dir: Path, *, embed_images: bool = False) -> Path:
    limit = 200
    counts = report["counts"]
    separation = report["separation"]
    diversity = report["diversity"]
    leakage = report.get("leakage")
    worst = sorted(
        report["identities"], key=lambda row: (row["mean_to_target"] or 0.0, row["label"])
    )[:20]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>digi2real dataset report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}",
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}",
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}",
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd}",
        "</style></head><body><h1>digi2real dataset report</h1>",
        _table(
            ("images", "identities", "rejected", "errors", "collisions", "leaks", "near dups"),
            [
                (
                    counts["images"],
                    counts["identities"],
                    counts.get("rejected", "n/a"),
                    counts.get("errors", "n/a"),
                    separation["num_collisions"],
                    leakage["num_leaks"] if leakage else "no gallery",
                    diversity["num_near_duplicates"],
                )
            ],
        ),
        "<h2>Consistency and separation</h2>",
        f"<img src='{_image_src(report_dir / HIST_PNG, embed_images)}' alt='similarity histogram'>",
        _distribution_table(
            {
                **report["consistency"],
                "nearest other identity": separation["nearest_other"],
                "mean pairwise distance": diversity["mean_pairwise_distance"],
                "images per identity": counts["images_per_identity"],
            }
        ),
        f"<h2>Collisions (centroid cosine &ge; {report['thresholds']['collision']})</h2>",
        _table(
            ("a", "label a", "b", "label b", "score"),
            [
                (p["a"], p["label_a"], p["b"], p["label_b"], p["score"])
                for p in separation["collisions"][:limit]
            ],
        ),
    ]
    if leakage:
        parts += [
            f"<h2>Leakage against {html_lib.escape(str(leakage['gallery']))} "
            f"(cosine &ge; {leakage['threshold']})</h2>",
            _table(
                ("identity", "label", "gallery identity", "score", "matched by", "image"),
                [
                    (
                        leak["identity"],
                        leak["label"],
                        leak["gallery_identity"],
                        leak["score"],
                        "+".join(leak["matched"]),
                        leak["image"],
                    )
                    for leak in leakage["leaks"][:limit]
                ],
            ),
        ]
    parts += [
        f"<h2>Near duplicates (cosine &ge; {report['thresholds']['near_duplicate']})</h2>",
        _table(
            ("identity", "a", "b", "score"),
            [
                (d["identity"], d["a"], d["b"], d["score"])
                for d in diversity["near_duplicates"][:limit]
            ],
        ),
        "<h2>Least consistent identities</h2>",
        _table(
            (
                "identity",
                "label",
                "images",
                "mean to target",
                "mean to centroid",
                "nearest",
                "score",
            ),
            [
                (
                    row["identity"],
                    row["label"],
                    row["images"],
                    row["mean_to_target"],
                    row["mean_to_centroid"],
                    row["nearest"],
                    row["nearest_score"],
                )
                for row in worst
            ],
        ),
        "<h2>Contact sheets</h2>",
    ]
    for name in report.get("contact_sheets", []):
        src = _image_src(report_dir / name, embed_images)
        parts.append(f"<p><img src='{src}' alt='{html_lib.escape(name)}'></p>")
    parts.append("</body></html>\n")
    path = report_dir / INDEX_HTML
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- entry point


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n", "utf-8")
    tmp.replace(path)


def build_report(
    out_dir: str | Path,
    *,
    gallery: str | Path | None = None,
    gallery_embedder: GalleryEmbedder | None = None,
    html: bool = False,
    embed_images: bool = False,
    collision_threshold: float = DEFAULT_COLLISION_THRESHOLD,
    leak_threshold: float = DEFAULT_LEAK_THRESHOLD,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    contact_identities: int = 32,
    identities_per_sheet: int = 8,
    block: int = metrics.DEFAULT_BLOCK,
    judge: Callable[[Sequence[Path]], np.ndarray] | None = None,
    judge_name: str | None = None,
) -> dict[str, Any]:
    """Write ``OUT/report/`` (report.json, similarity_hist.png, contact sheets, optional HTML).

    ``gallery``: a ``.npy`` embedding file (identities from its rows file, else one identity
    per row) or a folder of real face images, embedded by ``gallery_embedder(folder)``.
    ``judge``: a stricter recognizer than the generation's, ``(image paths) -> (N, D) unit
    embeddings``: the outputs are re-embedded with it (``report/judge_outputs.npy``) and every
    identity-level figure uses those; the image-to-target figures stay the generation
    recognizer's (a target lives in that recognizer's space). A ``.npy`` gallery must then be
    in the judge's space too.
    Returns the report dict written to report.json.
    """
    _check_threshold("leak_threshold", leak_threshold)
    if contact_identities < 0 or identities_per_sheet < 1:
        raise ValueError(
            f"contact_identities must be >= 0 and identities_per_sheet >= 1, got "
            f"{contact_identities} and {identities_per_sheet}"
        )
    dataset = open_dataset(out_dir)
    report_dir = dataset.out_dir / REPORT_DIR
    report_dir.mkdir(exist_ok=True)
    generation_outputs = dataset.outputs
    if judge is not None:
        dataset.outputs = _judge_outputs(dataset, judge, report_dir / "judge_outputs.npy", block)
    figures = compute_figures(
        dataset.outputs,
        # targets live in the generation recognizer's space: with a judge the to-target
        # figures are recomputed below from the run's own embeddings
        dataset.targets if judge is None else dataset.outputs,
        dataset.codes,
        dataset.identities,
        labels=dataset.labels,
        keys=dataset.keys,
        collision_threshold=collision_threshold,
        duplicate_threshold=duplicate_threshold,
        block=block,
    )
    report = figures.figures
    if judge is not None:
        to_target = metrics.rowwise_cosine(generation_outputs, dataset.targets, block=block)
        report["consistency"]["image_to_target"] = distribution(to_target)
        for key in ("identity_mean_to_target", "identity_min_to_target"):
            report["consistency"][key] = None
        report["consistency"]["note"] = (
            "image_to_target uses the generation recognizer (targets are in its space); "
            "every other figure uses the judge"
        )
        report["judge"] = {"recognizer": judge_name, "embeddings": "judge_outputs.npy"}
    report["counts"]["rejected"] = _count_rows(dataset.out_dir / "rejected.parquet")
    report["counts"]["errors"] = _count_rows(dataset.out_dir / "errors.parquet")
    report["thresholds"]["leak"] = leak_threshold
    report["leakage"] = None
    if gallery is not None:
        gallery = Path(gallery)
        report["leakage"] = leakage_figures(
            dataset.outputs,
            dataset.codes,
            dataset.identities,
            load_gallery(gallery, gallery_embedder),
            leak_threshold,
            labels=dataset.labels,
            keys=dataset.keys,
            centroids=figures.centroids,
            gallery_name=gallery.name,
            block=block,
        )
    plot_histogram(figures, report_dir / HIST_PNG, collision_threshold=collision_threshold)
    sheets = contact_sheets(
        dataset, figures, report_dir, identities=contact_identities, per_sheet=identities_per_sheet
    )
    report["histogram_png"] = HIST_PNG
    report["contact_sheets"] = [path.name for path in sheets]
    _write_json(report_dir / REPORT_JSON, report)
    if html:
        write_html(report, report_dir, embed_images=embed_images)
    logger.info("report written to %s", report_dir)
    return report


def _judge_outputs(
    dataset: Dataset, judge: Callable[[Sequence[Path]], np.ndarray], path: Path, block: int
) -> np.ndarray:
    """Embed every accepted image with the judge, in blocks, into a memory map."""
    total = len(dataset.paths)
    array: np.ndarray | None = None
    for start in range(0, total, block):
        paths = [dataset.out_dir / p for p in dataset.paths[start : start + block]]
        embeddings = np.asarray(judge(paths), dtype=np.float32)
        if array is None:
            array = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float32, shape=(total, embeddings.shape[1])
            )
        array[start : start + len(paths)] = embeddings
    assert array is not None
    array.flush()
    return np.load(path, mmap_mode="r")


def load_report(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / REPORT_DIR / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `digi2real report {out_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- commands


def gallery_embedder(config: Config) -> GalleryEmbedder:
    """Embeds a folder of real faces with the weights' recognizer: identity folders, or one
    identity per image in a flat folder."""

    def embed(folder: Path) -> EmbeddingSet:
        from digi2real.face.images import embed_dataset
        from digi2real.face.stack import FaceStack

        embedded, _errors = embed_dataset(FaceStack.from_config(config), folder, flat=True)
        return embedded

    return embed


def judge_embedder(config: Config) -> Callable[[Sequence[Path]], np.ndarray] | None:
    """The report's stricter recognizer (``report.recognizer`` in the config), or None."""
    from digi2real.data.images import load_image
    from digi2real.face import FaceEmbedder, RecognizerSpec

    section = config.report
    if section.recognizer is None:
        return None
    path = Path(section.recognizer)
    spec = RecognizerSpec(
        file=path.name,
        input_size=section.input_size,
        color=section.color,
        mean=tuple(section.mean),
        std=tuple(section.std),
    )
    embedder = FaceEmbedder(
        spec, path, device=config.run.device if config.run.device != "auto" else "cpu"
    )

    def embed(paths: Sequence[Path]) -> np.ndarray:
        crops = []
        for image_path in paths:
            image = load_image(image_path)
            if image.shape[:2] != (section.input_size, section.input_size):
                from PIL import Image

                image = np.asarray(
                    Image.fromarray(image).resize((section.input_size,) * 2, Image.BICUBIC)
                )
            crops.append(image)
        return embedder.embed(np.stack(crops))

    return embed


def run_report(
    out: Path | None,
    *,
    gallery: Path | None,
    html: bool,
    source: Path | None,
    config: Config | None,
    thresholds: dict[str, float] | None = None,
    embed_images: bool = False,
) -> str:
    """``digi2real report``: a converted dataset's report (and a refreshed dataset card), or
    with ``source`` the separation check of a source dataset before any GPU time."""
    from digi2real.analysis.card import write_card

    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    if source is not None:
        if source.suffix == ".npy":
            data = load_embeddings(source, mmap=True)
        else:
            if config is None or config.weights is None:
                raise ValueError("report --source on images needs weights (--weights DIR)")
            data = gallery_embedder(config)(source)
        if data.identities is None:
            raise ValueError(f"{source}: identities unknown (no rows file beside it)")
        threshold = thresholds.get("collision_threshold", DEFAULT_COLLISION_THRESHOLD)
        result = source_report(np.asarray(data.embeddings), data.identities, threshold)
        return _format_source(result, threshold)
    if out is None:
        raise ValueError("report needs a converted dataset OUT (or --source SRC)")
    embedder = (
        gallery_embedder(config)
        if (gallery is not None and config is not None and config.weights)
        else None
    )
    judge = judge_embedder(config) if config is not None else None
    result = build_report(
        out,
        gallery=gallery,
        gallery_embedder=embedder,
        html=html,
        embed_images=embed_images,
        judge=judge,
        judge_name=config.report.recognizer if config is not None and judge else None,
        **thresholds,
    )
    write_card(out)
    return _format_report(result, Path(out))


def _format_source(result: dict[str, Any], threshold: float) -> str:
    lines = [
        f"source identities: {result['identities']}, images: {result['images']}",
        f"near-duplicate identity pairs (centroid cosine >= {threshold}): {result['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in result["collisions"][:20]]
    if result["num_collisions"]:
        lines.append("these would be label noise after conversion: drop or merge them first")
    return "\n".join(lines)


def _format_report(result: dict[str, Any], out: Path) -> str:
    counts = result["counts"]
    consistency = result["consistency"]["image_to_target"]
    separation = result["separation"]
    leakage = result.get("leakage")
    lines = [
        f"images: {counts['images']} in {counts['identities']} identities",
        f"image-to-target cosine: mean {consistency.get('mean')}, min {consistency.get('min')}",
        f"identity collisions: {separation['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in separation["collisions"][:10]]
    if leakage is not None:
        lines.append(f"leaks against the gallery: {len(leakage['leaks'])}")
    lines.append(f"report: {OutLayout(out).report}")
    return "\n".join(lines)
