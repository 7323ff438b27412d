"""How far apart two populations of embeddings are: Fréchet distance and KID, streamed.

Small helpers in the spirit of faiss ``contrib/``: arrays (often memory-mapped) or iterators
of (B, D) blocks in, explicit dtype checks, ``logging``. Nothing of size N x D is ever held:

- :class:`Moments` accumulates count, mean and the scatter matrix (sum of outer products of
  deviations) in float64 and merges two of them exactly with Chan's parallel formula, so a
  population can be summed per block or per shard in any grouping.
- :func:`frechet_distance` is the distance between the Gaussians fitted to two populations
  (FID's formula, Heusel et al. 2017): ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2)``.
- :func:`kid` is the kernel inception distance (Bińkowski et al. 2018): the unbiased squared
  MMD with the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over random
  subsets (mean and standard deviation are reported).
- :class:`Pool` keeps a uniform sample of a stream of unknown length: each row's priority is
  a hash of (seed, population, row index) and the ``size`` lowest are kept (bottom-k), so
  the sample does not depend on block boundaries. KID's subsets are drawn from it with a
  seeded generator: every figure is a function of the data and the seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from digi2real.analysis import metrics

logger = logging.getLogger(__name__)

# torch-fidelity's and clean-fid's defaults for KID
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
# Rows kept per population for KID and the picture (20000 x 512 float32 = 41 MB).
DEFAULT_POOL = 20_000
# Rows turned into float64 at once while accumulating moments (8192 x 512 x 8 = 34 MB).
MOMENT_CHUNK = 8192

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def check_block(block: np.ndarray, dim: int | None, name: str) -> np.ndarray:
    """A finite float32/float64 (B, D) block (D = ``dim`` when given)."""
    if not isinstance(block, np.ndarray) or block.ndim != 2:
        shape = getattr(block, "shape", None)
        raise ValueError(f"{name}: blocks must be 2-d numpy arrays, got shape {shape}")
    if block.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: embeddings must be float32 or float64, got {block.dtype}")
    if dim is not None and block.shape[1] != dim:
        raise ValueError(f"{name}: {block.shape[1]}-d rows after {dim}-d rows")
    if not np.isfinite(block).all():
        raise ValueError(f"{name}: non-finite embedding values (NaN or inf)")
    return block


# ---------------------------------------------------------------------------- moments


@dataclass
class Moments:
    """Streaming float64 count, mean (D,) and scatter (D, D) of a population's rows."""

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, rows: np.ndarray) -> Moments:
        rows = np.asarray(rows, dtype=np.float64)
        mean = rows.mean(axis=0)
        centred = rows - mean
        return cls(len(rows), mean, centred.T @ centred)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: Moments) -> Moments:
        """Both populations' moments (Chan et al.'s pairwise update, exact in any order)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {self.dim}-d moments with {other.dim}-d moments")
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.scatter.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.scatter.copy())
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        scatter = (
            self.scatter
            + other.scatter
            + np.outer(delta, delta) * (self.count * other.count / count)
        )
        return Moments(count, mean, scatter)

    def update(self, block: np.ndarray) -> Moments:
        """Add a (B, D) block in place (converted to float64 a chunk at a time)."""
        for start in range(0, len(block), MOMENT_CHUNK):
            merged = self.merge(Moments.of(block[start : start + MOMENT_CHUNK]))
            self.count, self.mean, self.scatter = merged.count, merged.mean, merged.scatter
        return self

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance (count - 1 in the denominator), float64 (D, D)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
        return self.scatter / (self.count - 1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """``tr((A B)^1/2)`` for symmetric PSD A, B.

    A B is similar to ``A^1/2 B A^1/2``, which is symmetric PSD, so the trace is the sum of
    the square roots of its eigenvalues: no general (complex) matrix square root, no
    imaginary parts to discard, exact for singular covariances (a gallery smaller than D).
    """
    root = _sqrt_psd(a)
    inner = root @ b @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_gaussians(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mean_a, cov_a) and N(mean_b, cov_b)."""
    difference = np.asarray(mean_a, np.float64) - np.asarray(mean_b, np.float64)
    value = (
        difference @ difference
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2.0 * trace_sqrt_product(np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64))
    )
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical inputs


def frechet_distance(a: Moments, b: Moments) -> float:
    """The Fréchet distance between the Gaussians fitted to two populations' moments."""
    if a.dim != b.dim:
        raise ValueError(f"populations differ in width: {a.dim} vs {b.dim}")
    return frechet_gaussians(a.mean, a.covariance, b.mean, b.covariance)


# ---------------------------------------------------------------------------- KID


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD of two samples with the kernel ``(x.y / D + 1)^3``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 rows per sample, got {m} and {n}")
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subsets: int = DEFAULT_KID_SUBSETS,
    subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float, int]:
    """(mean, std, subset size) of :func:`polynomial_mmd2` over ``subsets`` pairs of subsets,
    each drawn without replacement from ``x`` and ``y`` by a generator seeded with ``seed``."""
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            polynomial_mmd2(
                x[np.sort(rng.choice(len(x), size, replace=False))],
                y[np.sort(rng.choice(len(y), size, replace=False))],
            )
            for _ in range(subsets)
        ]
    )
    return float(values.mean()), float(values.std()), size


# ---------------------------------------------------------------------------- populations


def _priorities(offset: int, start: int, count: int) -> np.ndarray:
    """splitmix64 of ``offset + row index``: a stable uniform priority per row."""
    with np.errstate(over="ignore"):
        z = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(offset)) & _MASK64
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _offset(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Pool:
    """A uniform sample of at most ``size`` rows of a stream, independent of its blocking."""

    size: int
    offset: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rows: np.ndarray | None = None
    seen: int = 0

    def offer(self, block: np.ndarray) -> None:
        keys = _priorities(self.offset, self.seen, len(block))
        positions = np.arange(self.seen, self.seen + len(block), dtype=np.int64)
        self.seen += len(block)
        if self.size == 0:
            return
        if len(self.keys) >= self.size:
            wanted = keys < self.keys.max()
            if not wanted.any():
                return
            keys, positions, block = keys[wanted], positions[wanted], block[wanted]
        rows = np.asarray(block, dtype=np.float32)
        if self.rows is None:
            self.rows = np.zeros((0, rows.shape[1]), np.float32)
        keys = np.concatenate([self.keys, keys])
        positions = np.concatenate([self.positions, positions])
        rows = np.concatenate([self.rows, rows])
        keep = np.lexsort((positions, keys))[: self.size]
        self.keys, self.positions, self.rows = keys[keep], positions[keep], rows[keep]

    def in_stream_order(self) -> np.ndarray:
        if self.rows is None:
            raise ValueError("the pool holds no rows")
        return self.rows[np.argsort(self.positions)]


@dataclass
class Population:
    """A population's moments and a uniform sample of its rows (float32)."""

    name: str
    moments: Moments
    sample: np.ndarray

    @property
    def count(self) -> int:
        return self.moments.count


def summarize(
    name: str, blocks: Iterable[np.ndarray], *, pool: int = DEFAULT_POOL, seed: int = 0
) -> Population:
    """One pass over ``blocks`` (each (B, D), in a fixed order): moments and a sample."""
    moments: Moments | None = None
    sample = Pool(pool, _offset(seed, name))
    for block in blocks:
        block = check_block(block, moments.dim if moments else None, name)
        if len(block) == 0:
            continue
        if moments is None:
            moments = Moments.empty(block.shape[1])
        moments.update(block)
        sample.offer(block)
    if moments is None or sample.rows is None:
        raise ValueError(f"{name}: no embeddings")
    rows = sample.in_stream_order()
    logger.info("%s: %d rows, %d-d, %d sampled", name, moments.count, moments.dim, len(rows))
    return Population(name, moments, rows)


def array_blocks(array: np.ndarray, block: int = metrics.DEFAULT_BLOCK) -> Iterator[np.ndarray]:
    """The (possibly memory-mapped) (N, D) ``array`` in blocks, its pages released as read."""
    for _, chunk in metrics.iter_rows(array, block):
        yield chunk


# ---------------------------------------------------------------------------- the gap


def gap_figures(
    reference: Population,
    other: Population,
    *,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, Any]:
    """Fréchet distance and KID of ``other`` against ``reference`` (None where a population
    has fewer than 2 rows)."""
    if reference.moments.dim != other.moments.dim:
        raise ValueError(
            f"{other.name} is {other.moments.dim}-d but {reference.name} is "
            f"{reference.moments.dim}-d: embed both in the same space"
        )
    figures: dict[str, Any] = {"count": other.count, "fd": None, "kid": None, "kid_std": None}
    if min(reference.count, other.count) < 2:
        return figures
    figures["fd"] = frechet_distance(reference.moments, other.moments)
    mean, std, size = kid(
        reference.sample,
        other.sample,
        subsets=kid_subsets,
        subset_size=kid_subset_size,
        seed=seed,
    )
    figures.update(kid=mean, kid_std=std, kid_subset_size=size, kid_subsets=kid_subsets)
    return figures


def gap_closed(source: float | None, output: float | None) -> float | None:
    """``1 - output / source``: 1 = the outputs sit where the reference does, 0 = no closer
    than the sources, negative = further away. None when the sources show no gap."""
    if source is None or output is None or source <= 0:
        return None
    return 1.0 - output / source


def principal_axes(moments: Moments, k: int = 2) -> np.ndarray:
    """The ``k`` leading eigenvectors of the covariance (rows), each signed so its largest
    component is positive (eigenvectors have no sign of their own)."""
    values, vectors = np.linalg.eigh(moments.covariance)
    axes = vectors[:, np.argsort(values)[::-1][:k]].T
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    return axes * signs[:, None]


def project(rows: np.ndarray, moments: Moments, axes: np.ndarray) -> np.ndarray:
    """Rows on ``axes`` around the reference's mean: (N, k) float64."""
    return (np.asarray(rows, np.float64) - moments.mean) @ axes.T
