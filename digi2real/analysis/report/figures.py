"""The report's numbers: consistency, separation, diversity, histograms and leakage.

Pure functions of embedding arrays (memory-mapped or not, streamed in blocks); nothing
here reads or writes OUT.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.data.embeddings import EmbeddingSet

logger = logging.getLogger(__name__)

REPORT_FORMAT = 1

# Centroids average the noise away, so distinct identities sit far lower than genuine
# image pairs; 0.6 between centroids is already the same person for ArcFace R100.
DEFAULT_COLLISION_THRESHOLD = 0.6
# An image or centroid at 0.5 to a real identity's centroid is a verification match.
DEFAULT_LEAK_THRESHOLD = 0.5
DEFAULT_DUPLICATE_THRESHOLD = 0.95
HIST_BINS = 200


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


def check_threshold(name: str, value: float) -> float:
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
    collision_threshold = check_threshold("collision_threshold", collision_threshold)
    duplicate_threshold = check_threshold("duplicate_threshold", duplicate_threshold)
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
    threshold = check_threshold("leak_threshold", threshold)
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
    threshold = check_threshold("threshold", threshold)
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
