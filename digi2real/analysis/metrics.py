"""Identity consistency, collisions, leakage and near duplicates over embedding arrays.

Small single-purpose helpers in the spirit of faiss ``contrib/``: each takes arrays (often
memory-mapped ``.npy`` files of millions of rows) and streams them in blocks, so nothing
of size N x N or a second copy of an (N, D) array is ever held. Embeddings are float32
(N, D) L2-normalised, so inner product is cosine similarity. Labels are int codes
``0..K-1`` (one per identity, every code present); :func:`encode_labels` turns names into
such codes.

Pages of a memory-mapped input are handed back to the kernel after each block is read
(``madvise(MADV_DONTNEED)``; the file stays in the page cache), so reading a 2 GB array
does not grow the resident set by 2 GB.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = 65536
# Query rows per faiss call: the (block x K) score tile faiss builds internally stays small.
DEFAULT_QUERY_BLOCK = 4096


# ---------------------------------------------------------------------------- checks


def check_float32(array: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Check ``array`` is a non-empty float32 (N, D) array; mmap arrays are returned as is."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {array.shape}")
    if array.dtype != np.float32:
        raise ValueError(
            f"{name} must be float32, got {array.dtype}; convert with .astype(np.float32)"
        )
    return array


def check_labels(labels: np.ndarray, n: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be a 1-d array of {n} entries, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer codes, got {labels.dtype}; see encode_labels")
    if n and labels.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def encode_labels(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Map names to int64 codes over the sorted unique names (ImageFolder order)."""
    uniques, codes = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def _num_identities(labels: np.ndarray, num_identities: int | None) -> int:
    top = int(labels.max()) + 1 if labels.size else 0
    if num_identities is None:
        return top
    if num_identities < top:
        raise ValueError(f"num_identities={num_identities} but labels go up to {top - 1}")
    return num_identities


# ---------------------------------------------------------------------------- blocks


def iter_blocks(n: int, block: int) -> Iterator[slice]:
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))


def _backing_mmap(array: np.ndarray) -> mmap.mmap | None:
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base if isinstance(base, mmap.mmap) else None


def release_pages(array: np.ndarray) -> None:
    """Drop this process's resident pages behind a read-only mmap view (no-op otherwise).

    The data stays in the page cache; only the mapping's resident set shrinks, which is what
    keeps a full streaming pass over a file-backed array from counting the whole file as RSS.
    """
    mapped = _backing_mmap(array)
    if mapped is None or array.size == 0 or not hasattr(mapped, "madvise"):
        return
    try:
        base_address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        return
    start = array.ctypes.data - base_address
    end = start + array.nbytes
    page = mmap.PAGESIZE
    # Only whole pages inside the view: a neighbouring block's partial page stays mapped.
    first = -(-start // page) * page
    last = (end // page) * page
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def read_block(array: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Copy ``array[rows]`` into memory and release the mapped pages it came from."""
    if isinstance(rows, slice):
        view = array[rows]
        out = np.array(view, copy=True)
        release_pages(view)
        return out
    out = np.asarray(array[rows])
    # A gather from a map touches scattered pages: release the covering range.
    if len(rows):
        release_pages(array[int(rows.min()) : int(rows.max()) + 1])
    return out


def iter_rows(array: np.ndarray, block: int = DEFAULT_BLOCK) -> Iterator[tuple[slice, np.ndarray]]:
    for rows in iter_blocks(array.shape[0], block):
        yield rows, read_block(array, rows)


# ---------------------------------------------------------------------------- centroids


def identity_sums(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    num_identities: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-identity float64 sums (K, D) and int64 counts (K,), one streaming pass."""
    embeddings = check_float32(embeddings)
    labels = check_labels(labels, embeddings.shape[0])
    k = _num_identities(labels, num_identities)
    sums = np.zeros((k, embeddings.shape[1]), dtype=np.float64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    for rows, chunk in iter_rows(embeddings, block):
        chunk_labels = labels[rows]
        order = np.argsort(chunk_labels, kind="stable")
        sorted_labels = chunk_labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        # reduceat over label runs: one vectorised add per block instead of np.add.at per row.
        sums[sorted_labels[starts]] += np.add.reduceat(chunk[order], starts, axis=0)
    return sums, counts


def identity_centroids(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    num_identities: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 centroids (K, D) and counts (K,); every label must occur."""
    sums, counts = identity_sums(embeddings, labels, num_identities=num_identities, block=block)
    return centroids_from_sums(sums, counts), counts


def centroids_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"{empty.size} label(s) have no rows (first: {int(empty[0])}); "
            "labels must be contiguous codes, see encode_labels"
        )
    norms = np.linalg.norm(sums, axis=1)
    degenerate = np.flatnonzero(norms <= 1e-12)
    if degenerate.size:
        raise ValueError(f"identity {int(degenerate[0])} has a zero centroid (images cancel out)")
    return (sums / norms[:, None]).astype(np.float32)


def mean_pairwise_distance(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean cosine distance over distinct image pairs per identity (NaN where count < 2).

    For unit vectors, sum_{i != j} x_i . x_j = ||sum x||^2 - n, so the sums from one streaming
    pass give every identity's diversity without any pairwise matrix.
    """
    n = counts.astype(np.float64)
    squared = np.einsum("kd,kd->k", sums, sums)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_cosine = (squared - n) / (n * (n - 1))
    out = 1.0 - mean_cosine
    out[counts < 2] = np.nan
    return out


def row_to_centroid(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    *,
    block: int = DEFAULT_BLOCK,
) -> np.ndarray:
    """Cosine of each row to its own identity's centroid, float32 (N,)."""
    embeddings = check_float32(embeddings)
    centroids = check_float32(centroids, "centroids")
    labels = check_labels(labels, embeddings.shape[0])
    out = np.empty(embeddings.shape[0], dtype=np.float32)
    for rows, chunk in iter_rows(embeddings, block):
        out[rows] = np.einsum("nd,nd->n", chunk, centroids[labels[rows]])
    return out


def rowwise_cosine(a: np.ndarray, b: np.ndarray, *, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Cosine of row i of ``a`` with row i of ``b`` (e.g. outputs vs their targets)."""
    a = check_float32(a, "a")
    b = check_float32(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"row-aligned arrays differ in shape: {a.shape} vs {b.shape}")
    out = np.empty(a.shape[0], dtype=np.float32)
    for rows in iter_blocks(a.shape[0], block):
        out[rows] = np.einsum("nd,nd->n", read_block(a, rows), read_block(b, rows))
    return out


# ---------------------------------------------------------------------------- faiss search


def _flat_ip(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors))
    return index


def nearest_other(
    centroids: np.ndarray, k: int = 1, *, block: int = DEFAULT_QUERY_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """For each centroid its ``k`` most similar OTHER centroids: (scores (K, k), indices (K, k)).

    Exact search (``faiss.IndexFlatIP``) queried ``block`` rows at a time. With fewer than
    k+1 centroids the missing columns are ``-inf`` / ``-1``.
    """
    centroids = check_float32(centroids, "centroids")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = centroids.shape[0]
    index = _flat_ip(centroids)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    indices = np.full((n, k), -1, dtype=np.int64)
    # k+1 covers self; with duplicate centroids self may not be first, hence the mask.
    search_k = min(k + 1, n)
    for rows in iter_blocks(n, block):
        query = np.ascontiguousarray(centroids[rows])
        found_scores, found = index.search(query, search_k)
        own = np.arange(rows.start, rows.stop)[:, None]
        keep = (found != own) & (found >= 0)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(found, order, axis=1)
        picked_scores = np.take_along_axis(found_scores, order, axis=1)
        valid = np.take_along_axis(keep, order, axis=1)
        width = picked.shape[1]
        indices[rows, :width] = np.where(valid, picked, -1)
        scores[rows, :width] = np.where(valid, picked_scores, -np.inf)
    return scores, indices


def collision_pairs(
    centroids: np.ndarray,
    threshold: float,
    *,
    nearest_scores: np.ndarray | None = None,
    block: int = DEFAULT_QUERY_BLOCK,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, score), i < j, of centroids with cosine >= ``threshold``, sorted by (i, j).

    ``nearest_scores`` (each centroid's best other score, from :func:`nearest_other`) is an
    exact shortcut: a centroid whose nearest other is below threshold is in no pair, so only
    the few candidates are searched against each other.
    """
    centroids = check_float32(centroids, "centroids")
    n = centroids.shape[0]
    if nearest_scores is not None:
        nearest_scores = np.asarray(nearest_scores).reshape(n, -1)[:, 0]
        candidates = np.flatnonzero(nearest_scores >= threshold)
    else:
        candidates = np.arange(n)
    if candidates.size < 2:
        return []
    subset = centroids[candidates] if candidates.size < n else centroids
    index = _flat_ip(subset)
    pairs: list[tuple[int, int, float]] = []
    # faiss keeps inner products strictly above the radius; the margin makes it >= threshold.
    radius = float(threshold) - 1e-6
    for rows in iter_blocks(subset.shape[0], block):
        lims, found_scores, found = index.range_search(np.ascontiguousarray(subset[rows]), radius)
        query = np.repeat(np.arange(rows.start, rows.stop), np.diff(lims).astype(np.int64))
        keep = (found > query) & (found_scores >= threshold)
        pairs.extend(
            zip(
                candidates[query[keep]].tolist(),
                candidates[found[keep]].tolist(),
                found_scores[keep].astype(float).tolist(),
                strict=True,
            )
        )
    pairs.sort()
    return pairs


@dataclass(frozen=True)
class Leak:
    """A generated identity that matches a gallery identity.

    ``centroid_*``: best gallery identity for the generated centroid; ``image_*``: best over
    the identity's images (``image_row`` is the row in the generated arrays). ``matched``
    names which of them reached the threshold.
    """

    label: int
    centroid_gallery_label: int
    centroid_score: float
    image_gallery_label: int
    image_score: float
    image_row: int
    matched: tuple[str, ...]

    @property
    def score(self) -> float:
        return max(self.centroid_score, self.image_score)

    @property
    def gallery_label(self) -> int:
        if self.centroid_score >= self.image_score:
            return self.centroid_gallery_label
        return self.image_gallery_label


def leakage(
    gen_embeddings: np.ndarray,
    gen_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray | None,
    threshold: float,
    *,
    gen_centroids: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
) -> list[Leak]:
    """Generated identities whose centroid or any image reaches ``threshold`` against a gallery.

    Gallery identities are represented by their centroids (``gallery_labels`` None: every
    gallery row is its own identity). Results are sorted by generated label.
    """
    gen_embeddings = check_float32(gen_embeddings, "gen_embeddings")
    gallery_embeddings = check_float32(gallery_embeddings, "gallery_embeddings")
    if gen_embeddings.shape[1] != gallery_embeddings.shape[1]:
        raise ValueError(
            f"generated embeddings are {gen_embeddings.shape[1]}-d but the gallery's are "
            f"{gallery_embeddings.shape[1]}-d; embed both with the same recognizer"
        )
    gen_labels = check_labels(gen_labels, gen_embeddings.shape[0], "gen_labels")
    if gallery_labels is None:
        gallery_centroids = np.empty(gallery_embeddings.shape, dtype=np.float32)
        for rows, chunk in iter_rows(gallery_embeddings, block):
            gallery_centroids[rows] = chunk
    else:
        gallery_labels = check_labels(gallery_labels, gallery_embeddings.shape[0], "gallery_labels")
        gallery_centroids, _ = identity_centroids(gallery_embeddings, gallery_labels, block=block)
    if gen_centroids is None:
        gen_centroids, _ = identity_centroids(gen_embeddings, gen_labels, block=block)
    index = _flat_ip(gallery_centroids)
    k = gen_centroids.shape[0]

    centroid_scores = np.empty(k, dtype=np.float32)
    centroid_match = np.empty(k, dtype=np.int64)
    for rows in iter_blocks(k, DEFAULT_QUERY_BLOCK):
        found_scores, found = index.search(np.ascontiguousarray(gen_centroids[rows]), 1)
        centroid_scores[rows] = found_scores[:, 0]
        centroid_match[rows] = found[:, 0]

    image_scores = np.full(k, -np.inf, dtype=np.float32)
    image_match = np.full(k, -1, dtype=np.int64)
    image_row = np.full(k, -1, dtype=np.int64)
    for rows, chunk in iter_rows(gen_embeddings, block):
        found_scores, found = index.search(chunk, 1)
        chunk_labels = gen_labels[rows]
        row_ids = np.arange(rows.start, rows.stop)
        # Best row per identity inside the block: sort by (label, -score), first of each run.
        order = np.lexsort((-found_scores[:, 0], chunk_labels))
        sorted_labels = chunk_labels[order]
        first = order[np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]]
        better = found_scores[first, 0] > image_scores[chunk_labels[first]]
        winners = first[better]
        target = chunk_labels[winners]
        image_scores[target] = found_scores[winners, 0]
        image_match[target] = found[winners, 0]
        image_row[target] = row_ids[winners]

    leaks = []
    for label in np.flatnonzero((centroid_scores >= threshold) | (image_scores >= threshold)):
        matched = tuple(
            name
            for name, score in (
                ("centroid", centroid_scores[label]),
                ("image", image_scores[label]),
            )
            if score >= threshold
        )
        leaks.append(
            Leak(
                label=int(label),
                centroid_gallery_label=int(centroid_match[label]),
                centroid_score=float(centroid_scores[label]),
                image_gallery_label=int(image_match[label]),
                image_score=float(image_scores[label]),
                image_row=int(image_row[label]),
                matched=matched,
            )
        )
    return leaks


# ---------------------------------------------------------------------------- within identity


def iter_identity_groups(
    embeddings: np.ndarray, labels: np.ndarray, *, block: int = DEFAULT_BLOCK
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (label, row indices, rows' embeddings) per identity, reading ~``block`` rows at once.

    Rows are gathered in label order; an identity larger than ``block`` comes as one group
    all the same (its images must be compared with each other).
    """
    embeddings = check_float32(embeddings)
    labels = check_labels(labels, embeddings.shape[0])
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(order)]
    group = 0
    while group < len(starts):
        last = group
        while last + 1 < len(starts) and ends[last + 1] - starts[group] <= block:
            last += 1
        span = order[starts[group] : ends[last]]
        # Gather in file order so a memory map is read forwards, then undo the permutation.
        file_order = np.argsort(span, kind="stable")
        chunk = np.empty((len(span), embeddings.shape[1]), dtype=np.float32)
        chunk[file_order] = read_block(embeddings, span[file_order])
        base = starts[group]
        for member in range(group, last + 1):
            local = slice(starts[member] - base, ends[member] - base)
            yield int(sorted_labels[starts[member]]), span[local], chunk[local]
        group = last + 1


def near_duplicates(
    embeddings: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    *,
    block: int = DEFAULT_BLOCK,
) -> list[tuple[int, int, float]]:
    """Row pairs (i, j, score), i < j, of the same identity with cosine >= ``threshold``."""
    pairs: list[tuple[int, int, float]] = []
    for _, rows, chunk in iter_identity_groups(embeddings, labels, block=block):
        if len(rows) < 2:
            continue
        gram = chunk @ chunk.T
        first, second = np.nonzero(np.triu(gram >= threshold, k=1))
        for a, b in zip(first.tolist(), second.tolist(), strict=True):
            i, j = int(rows[a]), int(rows[b])
            pairs.append((min(i, j), max(i, j), float(gram[a, b])))
    pairs.sort()
    return pairs


def intra_inter_samples(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    centroids: np.ndarray | None = None,
    nearest_scores: np.ndarray | None = None,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples for the intra- vs inter-identity histogram.

    intra: cosine of each image to its own identity's centroid (N,); inter: cosine of each
    identity's centroid to the nearest other centroid (K,). Precomputed ``centroids`` /
    ``nearest_scores`` are reused when given.
    """
    if centroids is None:
        centroids, _ = identity_centroids(embeddings, labels, block=block)
    intra = row_to_centroid(embeddings, labels, centroids, block=block)
    if nearest_scores is None:
        nearest_scores, _ = nearest_other(centroids, k=1)
    inter = np.asarray(nearest_scores, dtype=np.float32).reshape(centroids.shape[0], -1)[:, 0]
    return intra, inter[np.isfinite(inter)]
