"""Domain-gap correction of identity conditioning in Arc2Face's CLIP encoder space.

Arc2Face's text encoder maps an ArcFace vector to a (T, D) conditioning (77 x 768 for the
real weights). Conditioning computed from graphics renders sits in a different region of
that space than conditioning of real faces. This module

1. streams encoder outputs into per-(position, dimension) statistics
   (:class:`ConditioningStats`, float64 count / mean / M2, merged with Chan's formula) and
   stores them as one ``.safetensors`` file with string metadata;
2. moves synthetic conditioning toward the real statistics (:class:`DomainShift`, methods
   ``mean_shift`` and ``moment_match``, strength ``alpha``);
3. measures the gap before and after the correction (:func:`compare`, :func:`format_compare`).

See docs/domain-shift.md for which parts are Digi2Real's idea and which are this project's
choices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.config import ShiftConfig

logger = logging.getLogger(__name__)

FORMAT_NAME = "digi2real.conditioning_stats"
FORMAT_VERSION = 1
KINDS = ("real", "synthetic")
METHODS = ("mean_shift", "moment_match")
POSITIONS = ("all", "varying")
DEFAULT_MAX_SAMPLES = 32
FEW_REAL_FACES = 100
# A standard deviation at or below TOLERANCE * max(1, |mean|) counts as zero: the constant
# prompt prefix of a causal encoder differs between machines and batch sizes only by
# floating-point noise, which must neither mark it "varying" nor blow up a variance ratio.
DEFAULT_TOLERANCE = 1e-4

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _package_version() -> str:
    # Imported late: the package's __init__ may import this module.
    from digi2real.version import __version__

    return __version__


def _sample_keys(source: str, start: int, n: int) -> np.ndarray:
    """Stable priorities of rows ``start .. start+n-1`` of ``source`` for bottom-k sampling."""
    keys = np.empty(n, dtype=np.int64)
    prefix = source.encode("utf-8") + b"\x00"
    for i in range(n):
        digest = hashlib.blake2b(prefix + str(start + i).encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little") >> 1  # fits int64
    return keys


def _as_float64(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        if not batch.is_floating_point():
            raise ValueError(f"conditioning must be floating point, got dtype {batch.dtype}")
        # Through torch: numpy has no bfloat16.
        return batch.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(batch)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"conditioning must be floating point, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


class ConditioningStats:
    """Streaming per-(position, dimension) statistics of encoder outputs.

    Accumulates in float64: ``count`` rows, ``mean`` (T, D) and ``m2`` (T, D), the sum of
    squared deviations from the mean (Welford within a batch is replaced by the exact
    batch moments combined with Chan's formula). ``variance`` is the population variance
    ``m2 / count``.

    Besides the moments it keeps a small deterministic sample (at most ``max_samples``
    rows, float16) of whole conditionings for the 2-D projection of :func:`compare`: each
    row gets a stable hash priority from (source, row index) and the lowest priorities are
    kept (bottom-k), which merges exactly like the moments do.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        kind: str,
        encoder_digest: str,
        source: str,
        created_by: str = "",
        max_samples: int = DEFAULT_MAX_SAMPLES,
        version: str | None = None,
    ) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"stats shape must be (T, D) with T, D >= 1, got {tuple(shape)}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not encoder_digest:
            raise ValueError("encoder_digest must be a non-empty string (the encoder's sha256)")
        if max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.kind = kind
        self.encoder_digest = encoder_digest
        self.source = source
        self.created_by = created_by
        self.version = _package_version() if version is None else version
        self.max_samples = int(max_samples)
        self.parts: list[dict[str, Any]] = []
        self.count = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)
        self.samples = np.zeros((0, *self.shape), dtype=np.float16)
        self.sample_keys = np.zeros(0, dtype=np.int64)
        self._file_sha256: str | None = None
        self._warned_range = False

    def __repr__(self) -> str:
        return (
            f"ConditioningStats(kind={self.kind!r}, shape={self.shape}, count={self.count}, "
            f"source={self.source!r}, encoder_digest={self.encoder_digest[:12]!r})"
        )

    @property
    def variance(self) -> np.ndarray:
        """Population variance ``m2 / count`` (T, D), float64."""
        if self.count == 0:
            raise ValueError("stats are empty (count 0): no variance")
        return self.m2 / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "encoder_digest": self.encoder_digest,
            "source": self.source,
            "version": self.version,
            "created_by": self.created_by,
            "max_samples": self.max_samples,
            "parts": self.parts,
        }

    def update(self, batch: np.ndarray | torch.Tensor) -> ConditioningStats:
        """Add a (B, T, D) batch of conditionings (any float dtype) in float64; returns self."""
        array = _as_float64(batch)
        if array.ndim != 3 or array.shape[1:] != self.shape:
            raise ValueError(
                f"batch must have shape (B, {self.shape[0]}, {self.shape[1]}), got {array.shape}"
            )
        n_batch = array.shape[0]
        if n_batch == 0:
            return self
        if not np.isfinite(array).all():
            raise ValueError("batch contains non-finite conditioning values (NaN or inf)")
        batch_mean = array.mean(axis=0)
        batch_m2 = np.square(array - batch_mean).sum(axis=0)
        start = self.count
        self.count, self.mean, self.m2 = _chan(
            self.count, self.mean, self.m2, n_batch, batch_mean, batch_m2
        )
        if self.max_samples:
            self._offer_samples(array, _sample_keys(self.source, start, n_batch))
        self._file_sha256 = None
        return self

    def _offer_samples(self, rows: np.ndarray, keys: np.ndarray) -> None:
        fits = np.abs(rows).reshape(len(rows), -1).max(axis=1) <= _FLOAT16_MAX
        if not fits.all() and not self._warned_range:
            logger.warning(
                "%d conditioning row(s) exceed the float16 range and are left out of the "
                "stored sample (the moments are unaffected)",
                int((~fits).sum()),
            )
            self._warned_range = True
        if len(self.sample_keys) >= self.max_samples:
            fits &= keys < self.sample_keys.max()
        if not fits.any():
            return
        self.samples, self.sample_keys = _bottom_k(
            self.samples,
            self.sample_keys,
            rows[fits].astype(np.float16),
            keys[fits],
            self.max_samples,
        )

    def merge(self, other: ConditioningStats) -> ConditioningStats:
        """A new stats object over both populations (Chan's parallel formula).

        Refuses a different shape, encoder digest or kind: a mixture of two encoders'
        outputs, or of real and synthetic faces, is no population worth correcting toward.
        """
        if not isinstance(other, ConditioningStats):
            raise ValueError(f"can only merge ConditioningStats, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge stats of shape {self.shape} with shape {other.shape}")
        if other.encoder_digest != self.encoder_digest:
            raise ValueError(
                "cannot merge stats of different encoders: "
                f"{self.encoder_digest} ({self.source}) vs {other.encoder_digest} ({other.source})"
            )
        if other.kind != self.kind:
            raise ValueError(f"cannot merge {self.kind!r} stats with {other.kind!r} stats")
        parts = self._as_parts() + other._as_parts()
        merged = ConditioningStats(
            self.shape,
            kind=self.kind,
            encoder_digest=self.encoder_digest,
            source="; ".join(part["source"] for part in parts),
            created_by=self.created_by,
            max_samples=max(self.max_samples, other.max_samples),
        )
        merged.parts = parts
        merged.count, merged.mean, merged.m2 = _chan(
            self.count, self.mean, self.m2, other.count, other.mean, other.m2
        )
        merged.samples, merged.sample_keys = _bottom_k(
            self.samples, self.sample_keys, other.samples, other.sample_keys, merged.max_samples
        )
        return merged

    def _as_parts(self) -> list[dict[str, Any]]:
        if self.parts:
            return list(self.parts)
        return [
            {
                "source": self.source,
                "count": self.count,
                "version": self.version,
                "created_by": self.created_by,
            }
        ]

    def to_bytes(self) -> bytes:
        """The exact bytes :meth:`save` writes (deterministic: no time, no host)."""
        if self.count == 0:
            raise ValueError(f"refusing to save empty stats ({self.source!r}: count 0)")
        tensors = {
            "count": np.array(float(self.count), dtype=np.float64),
            "mean": np.ascontiguousarray(self.mean, dtype=np.float64),
            "m2": np.ascontiguousarray(self.m2, dtype=np.float64),
        }
        if len(self.sample_keys):
            tensors["samples"] = np.ascontiguousarray(self.samples, dtype=np.float16)
            tensors["sample_keys"] = np.ascontiguousarray(self.sample_keys, dtype=np.int64)
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "meta": json.dumps(self.meta, sort_keys=True, ensure_ascii=False),
        }
        return _safetensors_bytes(tensors, metadata)

    def checksum(self) -> str:
        """sha256 of the stats file: the file's own bytes when loaded and unchanged."""
        if self._file_sha256 is not None:
            return self._file_sha256
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file atomically (temporary name, then rename)."""
        path = Path(path)
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._file_sha256 = hashlib.sha256(data).hexdigest()
        logger.info(
            "wrote %s stats of %d conditionings to %s (sha256 %s)",
            self.kind,
            self.count,
            path,
            self._file_sha256[:12],
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConditioningStats:
        """Read and validate a stats file written by :meth:`save`."""
        from safetensors.numpy import load

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"stats file not found: {path}")
        data = path.read_bytes()
        metadata = _safetensors_metadata(data, path)
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{path} is not a digi2real stats file (format {metadata.get('format')!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has stats format version {metadata.get('format_version')!r}; this "
                f"digi2real reads version {FORMAT_VERSION}"
            )
        try:
            meta = json.loads(metadata["meta"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has no valid JSON 'meta' entry: {error}") from error
        tensors = load(data)
        missing = [name for name in ("count", "mean", "m2") if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensor(s) {', '.join(missing)}")
        mean, m2, count = tensors["mean"], tensors["m2"], tensors["count"]
        if mean.ndim != 2 or m2.shape != mean.shape or count.size != 1:
            raise ValueError(
                f"{path}: expected mean and m2 of one (T, D) shape and a scalar count, got "
                f"mean {mean.shape}, m2 {m2.shape}, count {count.shape}"
            )
        if mean.dtype != np.float64 or m2.dtype != np.float64:
            raise ValueError(f"{path}: mean/m2 must be float64, got {mean.dtype}/{m2.dtype}")
        n = float(count.reshape(()))
        if not (n >= 1 and n == math.floor(n)):
            raise ValueError(f"{path}: count must be a positive integer, got {n}")
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()) or (m2 < 0).any():
            raise ValueError(f"{path}: mean/m2 must be finite and m2 non-negative")
        try:
            stats = cls(
                mean.shape,
                kind=meta["kind"],
                encoder_digest=meta["encoder_digest"],
                source=meta["source"],
                created_by=meta.get("created_by", ""),
                max_samples=int(meta.get("max_samples", 0)),
                version=meta["version"],
            )
        except KeyError as error:
            raise ValueError(f"{path}: metadata lacks {error}") from error
        stats.parts = list(meta.get("parts", []))
        stats.count = int(n)
        stats.mean = mean
        stats.m2 = m2
        if "samples" in tensors:
            samples, keys = tensors["samples"], tensors.get("sample_keys")
            if (
                keys is None
                or samples.shape[1:] != mean.shape
                or keys.shape != (samples.shape[0],)
                or samples.shape[0] > min(stats.max_samples, stats.count)
            ):
                raise ValueError(
                    f"{path}: samples {samples.shape} / keys "
                    f"{None if keys is None else keys.shape} do not fit mean {mean.shape}, "
                    f"max_samples {stats.max_samples}, count {stats.count}"
                )
            stats.samples = samples.astype(np.float16, copy=False)
            stats.sample_keys = keys.astype(np.int64, copy=False)
        stats._file_sha256 = hashlib.sha256(data).hexdigest()
        return stats


_SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
}


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise in the safetensors layout with a stable header.

    safetensors' own writer emits the ``__metadata__`` entries in hash-map order, which
    changes from process to process; the stats checksum must not.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    # Parsed from the bytes already read, so the checksum covers exactly what was validated.
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError) as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    return dict(header.get("__metadata__") or {})


def _chan(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine two (count, mean, M2) triples exactly (Chan, Golub & LeVeque)."""
    if n_b == 0:
        return n_a, mean_a.copy(), m2_a.copy()
    if n_a == 0:
        return n_b, mean_b.copy(), m2_b.copy()
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + np.square(delta) * (n_a * n_b / n)
    return n, mean, m2


def _bottom_k(
    samples_a: np.ndarray,
    keys_a: np.ndarray,
    samples_b: np.ndarray,
    keys_b: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    samples = np.concatenate([samples_a, samples_b])
    keys = np.concatenate([keys_a, keys_b])
    order = np.argsort(keys, kind="stable")[:k]
    return samples[order], keys[order]


def load_stats(
    path: str | Path,
    *,
    expected_encoder_digest: str | None = None,
    expected_kind: str | None = None,
) -> ConditioningStats:
    """Load a stats file, refusing one made with another encoder or of the other kind."""
    stats = ConditioningStats.load(path)
    if expected_encoder_digest is not None and stats.encoder_digest != expected_encoder_digest:
        raise ValueError(
            f"{path} was computed with encoder {stats.encoder_digest}, but the loaded encoder "
            f"is {expected_encoder_digest}; recompute the stats with these weights"
        )
    if expected_kind is not None and stats.kind != expected_kind:
        raise ValueError(f"{path} holds {stats.kind!r} stats, expected {expected_kind!r}")
    return stats


def embedding_batches(embeddings: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive row slices of an (N, d) array; with ``np.load(mmap_mode="r")`` memory stays
    flat in N."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(embeddings), batch_size):
        yield np.asarray(embeddings[start : start + batch_size], dtype=np.float32)


def compute_stats(
    batches: Iterable[np.ndarray],
    encode: Callable[[np.ndarray], torch.Tensor],
    *,
    kind: str,
    encoder_digest: str,
    source: str,
    created_by: str = "",
    max_samples: int | None = None,
) -> ConditioningStats:
    """Statistics of ``encode(batch)`` over a stream of (B, d) ArcFace embedding batches.

    One batch is held at a time, so memory does not grow with the number of faces.
    ``max_samples`` (whole conditionings kept for plots) defaults to
    :data:`DEFAULT_MAX_SAMPLES` for synthetic stats and to 0 for real ones: a stored
    conditioning of a real face is biometric data, so keeping any is an explicit choice.
    """
    if max_samples is None:
        max_samples = DEFAULT_MAX_SAMPLES if kind == "synthetic" else 0
    stats: ConditioningStats | None = None
    with torch.inference_mode():
        for batch in batches:
            if len(batch) == 0:
                continue
            conditioning = encode(batch)
            if stats is None:
                if conditioning.ndim != 3:
                    raise ValueError(
                        "encode must return (B, T, D) conditioning, "
                        f"got shape {tuple(conditioning.shape)}"
                    )
                stats = ConditioningStats(
                    (int(conditioning.shape[1]), int(conditioning.shape[2])),
                    kind=kind,
                    encoder_digest=encoder_digest,
                    source=source,
                    created_by=created_by,
                    max_samples=max_samples,
                )
            stats.update(conditioning)
            logger.debug("%s stats: %d conditionings", kind, stats.count)
    if stats is None:
        raise ValueError(f"no embeddings to compute {kind} stats from ({source})")
    logger.info("computed %s stats over %d conditionings of %s", kind, stats.count, source)
    if kind == "real" and stats.count < FEW_REAL_FACES:
        logger.warning(
            "real stats over only %d faces: the mean and variance of so few faces are close to "
            "the individual conditionings; use many faces, and share such a file with care",
            stats.count,
        )
    return stats


def merge_stats(paths: Sequence[str | Path], *, created_by: str = "") -> ConditioningStats:
    """Merge stats files (same encoder, same kind) into one, exactly."""
    if not paths:
        raise ValueError("merge_stats needs at least one stats file")
    merged = ConditioningStats.load(paths[0])
    for path in paths[1:]:
        merged = merged.merge(ConditioningStats.load(path))
    if created_by:
        merged.created_by = created_by
        merged._file_sha256 = None
    return merged


def _tiny(std: np.ndarray, mean: np.ndarray, tolerance: float) -> np.ndarray:
    return std <= tolerance * np.maximum(1.0, np.abs(mean))


def varying_positions(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """(T,) bool: token positions whose conditioning differs between identities.

    A position varies when any dimension's real or synthetic standard deviation exceeds
    ``tolerance * max(1, |mean|)``. In a causal encoder the prompt prefix before the id
    token is identical for everyone and does not vary.
    """
    _check_pair(real, synthetic)
    real_varies = ~_tiny(real.std, real.mean, tolerance)
    synthetic_varies = ~_tiny(synthetic.std, synthetic.mean, tolerance)
    return (real_varies | synthetic_varies).any(axis=1)


def _check_pair(real: ConditioningStats, synthetic: ConditioningStats) -> None:
    if real.kind != "real" or synthetic.kind != "synthetic":
        raise ValueError(
            f"expected real then synthetic stats, got {real.kind!r} ({real.source}) and "
            f"{synthetic.kind!r} ({synthetic.source})"
        )
    if real.shape != synthetic.shape:
        raise ValueError(
            f"real stats have shape {real.shape} but synthetic stats {synthetic.shape}"
        )
    if real.encoder_digest != synthetic.encoder_digest:
        raise ValueError(
            f"real stats ({real.source}) are of encoder {real.encoder_digest} but synthetic "
            f"stats ({synthetic.source}) of encoder {synthetic.encoder_digest}"
        )
    if real.count == 0 or synthetic.count == 0:
        raise ValueError("real and synthetic stats must both be non-empty")


@dataclass(frozen=True)
class DomainShift:
    """Moves synthetic identity conditioning toward real-face statistics.

    ``mean_shift``:   c' = c + alpha * (mu_real - mu_synth)
    ``moment_match``: m  = mu_real + (c - mu_synth) * sigma_real / sigma_synth
                      c' = c + alpha * (m - c)

    Both are per-(position, dimension) affine maps ``c' = c * scale + offset``, computed
    once in float64 at construction (later changes to the stats objects are not seen).
    Where the synthetic standard deviation is zero or tiny (at most
    ``tolerance * max(1, |mu_synth|)``) the ratio sigma_real / sigma_synth is taken as 1,
    so such elements are mean-shifted instead of producing NaN or inf.

    ``positions="varying"`` corrects only token positions whose conditioning differs
    between identities (see :func:`varying_positions`); the others are returned
    bit-for-bit. ``alpha = 0`` returns the input tensor itself. Apply to the identity
    conditioning only, never to the empty-prompt branch of classifier-free guidance.
    """

    method: str
    alpha: float
    positions: str
    real: ConditioningStats
    synthetic: ConditioningStats
    tolerance: float = DEFAULT_TOLERANCE
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)
    _mask: np.ndarray = field(init=False, repr=False, compare=False)
    _device_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown shift method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"unknown shift positions {self.positions!r}; valid: {', '.join(POSITIONS)}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {self.alpha}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, got {self.tolerance}")
        object.__setattr__(self, "alpha", float(self.alpha))  # numpy scalars -> JSON-able
        _check_pair(self.real, self.synthetic)

        alpha = self.alpha
        mu_real, mu_synth = self.real.mean, self.synthetic.mean
        if self.method == "mean_shift":
            scale = np.ones(self.real.shape)
            offset = alpha * (mu_real - mu_synth)
        else:
            std_synth = self.synthetic.std
            tiny = _tiny(std_synth, mu_synth, self.tolerance)
            ratio = np.where(tiny, 1.0, self.real.std / np.where(tiny, 1.0, std_synth))
            # c + alpha * (mu_r + (c - mu_s) * r - c), regrouped as c * scale + offset.
            scale = 1.0 + alpha * (ratio - 1.0)
            offset = alpha * (mu_real - mu_synth * ratio)
        if self.positions == "varying":
            mask = varying_positions(self.real, self.synthetic, self.tolerance)
        else:
            mask = np.ones(self.real.shape[0], dtype=bool)
        scale = np.where(mask[:, None], scale, 1.0)
        offset = np.where(mask[:, None], offset, 0.0)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_offset", offset)
        object.__setattr__(self, "_mask", mask)
        logger.debug(
            "domain shift %s alpha=%g on %d/%d positions",
            self.method,
            alpha,
            int(mask.sum()),
            mask.size,
        )

    @classmethod
    def from_files(
        cls,
        method: str,
        alpha: float,
        positions: str,
        real_path: str | Path,
        synthetic_path: str | Path,
        encoder_digest: str,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> DomainShift:
        """Load both stats files, refusing any not computed with ``encoder_digest``."""
        real = load_stats(real_path, expected_encoder_digest=encoder_digest, expected_kind="real")
        synthetic = load_stats(
            synthetic_path, expected_encoder_digest=encoder_digest, expected_kind="synthetic"
        )
        return cls(method, alpha, positions, real, synthetic, tolerance=tolerance)

    @classmethod
    def from_config(cls, shift: ShiftConfig, encoder_digest: str) -> DomainShift | None:
        """The shift a config's ``shift`` section asks for, or None when it is off."""
        if not shift.enabled:
            return None
        if shift.real_stats is None or shift.synthetic_stats is None:
            raise ValueError("shift.real_stats and shift.synthetic_stats must both be set")
        return cls.from_files(
            shift.method,
            shift.alpha,
            shift.positions,
            shift.real_stats,
            shift.synthetic_stats,
            encoder_digest,
        )

    @property
    def position_mask(self) -> np.ndarray:
        """(T,) bool: positions this shift changes."""
        return self._mask.copy()

    def corrected_stats(
        self, synthetic: ConditioningStats | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population variance (T, D), float64, of a synthetic population after
        the shift (by default the population the shift was estimated on)."""
        synthetic = self.synthetic if synthetic is None else synthetic
        mean = synthetic.mean * self._scale + self._offset
        variance = synthetic.variance * np.square(self._scale)
        return mean, variance

    def _coefficients(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = (
                torch.from_numpy(self._scale).to(device=device, dtype=dtype),
                torch.from_numpy(self._offset).to(device=device, dtype=dtype),
                torch.from_numpy(self._mask).to(device=device).view(1, -1, 1),
            )
            self._device_cache[key] = cached
        return cached

    def apply(self, cond: torch.Tensor) -> torch.Tensor:
        """Correct a (B, T, D) identity conditioning; returns a tensor of ``cond``'s dtype.

        Computed on ``cond``'s device in float32 (float64 when ``cond`` is float64).
        """
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise ValueError(f"cond must be a floating-point torch.Tensor, got {type(cond)}")
        if cond.ndim != 3 or tuple(cond.shape[1:]) != self.real.shape:
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, but the stats expect "
                f"(B, {self.real.shape[0]}, {self.real.shape[1]})"
            )
        if self.alpha == 0:
            return cond
        compute_dtype = torch.promote_types(cond.dtype, torch.float32)
        scale, offset, mask = self._coefficients(cond.device, compute_dtype)
        work = cond.to(compute_dtype)
        # mean_shift's scale is exactly 1: skip the multiply.
        out = work + offset if self.method == "mean_shift" else torch.addcmul(offset, work, scale)
        if not self._mask.all():
            out = torch.where(mask, out, work)
        return out.to(cond.dtype)

    def __call__(self, cond: torch.Tensor) -> torch.Tensor:
        return self.apply(cond)

    def describe(self) -> dict[str, Any]:
        """What went into the correction, for manifests and config.yaml (JSON-able)."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "positions": self.positions,
            "tolerance": self.tolerance,
            "encoder_digest": self.real.encoder_digest,
            "real_stats_sha256": self.real.checksum(),
            "synthetic_stats_sha256": self.synthetic.checksum(),
            "real_count": self.real.count,
            "synthetic_count": self.synthetic.count,
            "corrected_positions": int(self._mask.sum()),
        }


def _ratio_summary(
    real_mean: np.ndarray,
    real_var: np.ndarray,
    other_mean: np.ndarray,
    other_var: np.ndarray,
    tolerance: float,
) -> dict[str, float | int]:
    """Quantiles of var_other / var_real over elements that vary in both populations."""
    usable = ~_tiny(np.sqrt(real_var), real_mean, tolerance) & ~_tiny(
        np.sqrt(other_var), other_mean, tolerance
    )
    if not usable.any():
        nan = float("nan")
        return {"elements": 0, "median": nan, "p05": nan, "p95": nan, "mean_abs_log10": nan}
    ratio = other_var[usable] / real_var[usable]
    p05, median, p95 = np.quantile(ratio, [0.05, 0.5, 0.95])
    return {
        "elements": int(usable.sum()),
        "median": float(median),
        "p05": float(p05),
        "p95": float(p95),
        "mean_abs_log10": float(np.abs(np.log10(ratio)).mean()),
    }


def _gap(
    real: ConditioningStats, mean: np.ndarray, variance: np.ndarray, tolerance: float
) -> dict[str, Any]:
    difference = real.mean - mean
    distance = float(np.linalg.norm(difference))
    return {
        "mean_distance": distance,
        "relative_mean_distance": distance / max(float(np.linalg.norm(real.mean)), 1e-30),
        "mean_distance_per_position": np.linalg.norm(difference, axis=1).tolist(),
        "position_norms": np.linalg.norm(mean, axis=1).tolist(),
        "variance_ratio": _ratio_summary(real.mean, real.variance, mean, variance, tolerance),
    }


def compare(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    *,
    shift: DomainShift | None = None,
    out_png: Path | None = None,
    n_points: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The real/synthetic gap in conditioning space, before and (with ``shift``) after.

    "after" is analytic: the corrected synthetic mean and variance follow from the shift's
    per-element affine map. With ``out_png`` a figure is written: distance per position,
    per-position mean norms, a 2-D PCA of sample conditionings (stored samples when both
    files have some, else ``n_points`` Gaussian draws per population from the
    per-dimension stats, seeded by ``seed``) and the variance-ratio distribution.
    """
    _check_pair(real, synthetic)
    tolerance = shift.tolerance if shift is not None else DEFAULT_TOLERANCE
    if shift is not None:
        _check_pair(shift.real, synthetic)
        if shift.real.shape != real.shape or shift.real.encoder_digest != real.encoder_digest:
            raise ValueError("shift was built from stats of another shape or encoder")
    result: dict[str, Any] = {
        "shape": list(real.shape),
        "encoder_digest": real.encoder_digest,
        "real": {"count": real.count, "source": real.source, "sha256": real.checksum()},
        "synthetic": {
            "count": synthetic.count,
            "source": synthetic.source,
            "sha256": synthetic.checksum(),
        },
        "varying_positions": np.flatnonzero(varying_positions(real, synthetic, tolerance)).tolist(),
        "real_position_norms": np.linalg.norm(real.mean, axis=1).tolist(),
        "shift": None,
        "before": _gap(real, synthetic.mean, synthetic.variance, tolerance),
        "after": None,
    }
    if shift is not None:
        result["shift"] = shift.describe()
        corrected_mean, corrected_var = shift.corrected_stats(synthetic)
        result["after"] = _gap(real, corrected_mean, corrected_var, tolerance)
    if out_png is not None:
        result["projection"] = _plot(
            real, synthetic, shift, result, Path(out_png), n_points, seed, tolerance
        )
        result["png"] = str(out_png)
    return result


def _projection_points(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    n_points: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    if len(real.samples) >= 2 and len(synthetic.samples) >= 2:
        return (
            real.samples.astype(np.float32),
            synthetic.samples.astype(np.float32),
            "stored samples",
        )
    rng = np.random.default_rng(seed)
    points = [
        (stats.mean + stats.std * rng.standard_normal((n_points, *stats.shape))).astype(np.float32)
        for stats in (real, synthetic)
    ]
    return points[0], points[1], "Gaussian draws from per-dimension stats"


def _plot(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    shift: DomainShift | None,
    result: dict[str, Any],
    out_png: Path,
    n_points: int,
    seed: int,
    tolerance: float,
) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    real_points, synth_points, origin = _projection_points(real, synthetic, n_points, seed)
    corrected_points = None
    if shift is not None:
        corrected_points = shift.apply(torch.from_numpy(synth_points)).numpy()
    # Constant positions carry no spread; leaving them out keeps the PCA small.
    keep = varying_positions(real, synthetic, tolerance)
    if not keep.any():
        keep = np.ones_like(keep)

    def flat(points: np.ndarray) -> np.ndarray:
        return points[:, keep].reshape(len(points), -1).astype(np.float64)

    fit = np.concatenate([flat(real_points), flat(synth_points)])
    centre = fit.mean(axis=0)
    _, _, components = np.linalg.svd(fit - centre, full_matrices=False)
    basis = components[:2].T

    figure = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    positions = np.arange(real.shape[0])
    before, after = result["before"], result["after"]

    ax = axes[0, 0]
    ax.plot(positions, before["mean_distance_per_position"], label="before", marker=".")
    if after is not None:
        ax.plot(positions, after["mean_distance_per_position"], label="after", marker=".")
    ax.set(
        title="||mu_real - mu_synth|| per token position",
        xlabel="token position",
        ylabel="L2 distance",
    )
    ax.legend()

    ax = axes[0, 1]
    ax.plot(positions, result["real_position_norms"], label="real", marker=".")
    ax.plot(positions, before["position_norms"], label="synthetic", marker=".")
    if after is not None:
        ax.plot(positions, after["position_norms"], label="corrected", marker=".", ls="--")
    ax.set(title="per-position mean norm", xlabel="token position", ylabel="||mu||")
    ax.legend()

    ax = axes[1, 0]
    clouds = [("real", real_points, "tab:blue"), ("synthetic", synth_points, "tab:orange")]
    if corrected_points is not None:
        clouds.append(("corrected synthetic", corrected_points, "tab:green"))
    for label, points, colour in clouds:
        xy = (flat(points) - centre) @ basis
        ax.scatter(xy[:, 0], xy[:, 1], s=12, alpha=0.7, label=label, color=colour)
    ax.set(title=f"PCA of conditionings ({origin})", xlabel="PC 1", ylabel="PC 2")
    ax.legend()

    ax = axes[1, 1]
    sets = [("before", synthetic.mean, synthetic.variance)]
    if shift is not None:
        sets.append(("after", *shift.corrected_stats(synthetic)))
    log_ratios = []
    for label, gap_mean, gap_var in sets:
        usable = ~_tiny(np.sqrt(real.variance), real.mean, tolerance) & ~_tiny(
            np.sqrt(gap_var), gap_mean, tolerance
        )
        if usable.any():
            log_ratios.append((label, np.log10(gap_var[usable] / real.variance[usable])))
    if log_ratios:
        # Shared bins: after moment matching every ratio sits at 0, in a single bin.
        edges = np.histogram_bin_edges(np.concatenate([ratio for _, ratio in log_ratios]), 60)
        for label, ratio in log_ratios:
            ax.hist(ratio, bins=edges, alpha=0.6, label=label, log=True)
        ax.legend()
    ax.set(
        title="per-dimension log10(var_synth / var_real)",
        xlabel="log10 variance ratio",
        ylabel="elements",
    )

    title = f"real ({real.count}) vs synthetic ({synthetic.count}) conditioning"
    if shift is not None:
        title += f" - {shift.method}, alpha={shift.alpha:g}, positions={shift.positions}"
    figure.suptitle(title)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" entry: the PNG then depends only on the data.
    figure.savefig(out_png, dpi=100, metadata={"Software": None})
    logger.info("wrote domain-gap figure to %s", out_png)
    return origin


def format_compare(result: dict[str, Any], *, top: int = 10) -> str:
    """A small text table of :func:`compare`'s result for the terminal."""
    before, after = result["before"], result["after"]
    lines = [
        f"real:      {result['real']['count']} conditionings  ({result['real']['source']})",
        f"synthetic: {result['synthetic']['count']} conditionings  "
        f"({result['synthetic']['source']})",
        f"shape {tuple(result['shape'])}, encoder {result['encoder_digest'][:12]}, "
        f"{len(result['varying_positions'])} varying positions",
    ]
    if result["shift"] is not None:
        shift = result["shift"]
        lines.append(
            f"shift: {shift['method']}, alpha={shift['alpha']:g}, positions={shift['positions']}"
        )
    lines.append("")

    def column(gap: dict[str, Any] | None, getter: Callable[[dict[str, Any]], float]) -> str:
        return f"{getter(gap):>12.4g}" if gap is not None else f"{'-':>12}"

    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("mean distance (L2)", lambda gap: gap["mean_distance"]),
        ("relative distance", lambda gap: gap["relative_mean_distance"]),
        ("var_s/var_r median", lambda gap: gap["variance_ratio"]["median"]),
        ("var_s/var_r p05", lambda gap: gap["variance_ratio"]["p05"]),
        ("var_s/var_r p95", lambda gap: gap["variance_ratio"]["p95"]),
        ("mean |log10 ratio|", lambda gap: gap["variance_ratio"]["mean_abs_log10"]),
    ]
    lines.append(f"{'':<22}{'before':>12}{'after':>12}")
    for name, getter in rows:
        lines.append(f"{name:<22}{column(before, getter)}{column(after, getter)}")

    distances = np.asarray(before["mean_distance_per_position"])
    order = np.argsort(-distances, kind="stable")[:top]
    lines += ["", f"largest per-position gaps (top {len(order)} of {len(distances)}):"]
    lines.append(
        f"{'pos':>4}{'before':>12}{'after':>12}{'|mu_real|':>12}{'|mu_synth|':>12}{'|mu_corr|':>12}"
    )
    for position in order:
        after_distance = (
            f"{after['mean_distance_per_position'][position]:>12.4g}" if after else f"{'-':>12}"
        )
        corrected_norm = f"{after['position_norms'][position]:>12.4g}" if after else f"{'-':>12}"
        lines.append(
            f"{int(position):>4}{distances[position]:>12.4g}{after_distance}"
            f"{result['real_position_norms'][position]:>12.4g}"
            f"{before['position_norms'][position]:>12.4g}{corrected_norm}"
        )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_TOLERANCE",
    "FORMAT_VERSION",
    "METHODS",
    "POSITIONS",
    "ConditioningStats",
    "DomainShift",
    "compare",
    "compute_stats",
    "embedding_batches",
    "format_compare",
    "load_stats",
    "merge_stats",
    "varying_positions",
]


def compare_files(
    real: str | Path,
    synthetic: str | Path,
    *,
    method: str,
    alpha: float,
    positions: str,
    png: str | Path | None,
) -> str:
    """``digi2real stats compare``: the gap before and after the correction, as text (and a
    plot in ``png``)."""
    real_stats = load_stats(real, expected_kind="real")
    synth_stats = load_stats(
        synthetic,
        expected_kind="synthetic",
        expected_encoder_digest=real_stats.meta["encoder_digest"],
    )
    shift = DomainShift(method, alpha, positions, real_stats, synth_stats)
    result = compare(real_stats, synth_stats, shift=shift, out_png=png)
    text = format_compare(result)
    if png is not None:
        text += f"\nplot: {png}"
    return text
