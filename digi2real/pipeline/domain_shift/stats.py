"""Streaming statistics of encoder outputs and their file format.

:class:`ConditioningStats` accumulates per-(position, dimension) float64 count / mean / M2
(merged with Chan's formula) and a bottom-k sample of whole conditionings; it is stored as
one deterministic ``.safetensors`` file with string metadata. :func:`compute_stats` streams
embedding batches through an encoder into it, :func:`merge_stats` merges files exactly and
:func:`load_stats` loads one, refusing another encoder's or kind's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.data.fsio import atomic_write_bytes
from digi2real.data.node_cache import local_file
from digi2real.version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "digi2real.conditioning_stats"
FORMAT_VERSION = 1
KINDS = ("real", "synthetic")
DEFAULT_MAX_SAMPLES = 32
FEW_REAL_FACES = 100

_FLOAT16_MAX = float(np.finfo(np.float16).max)


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
        self.version = __version__ if version is None else version
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
        """Write one ``.safetensors`` file atomically (parent folders are created)."""
        data = self.to_bytes()
        path = atomic_write_bytes(path, data)
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
        """Read and validate a stats file written by :meth:`save`: a truncated, corrupt or
        tampered file is one ValueError naming it, never a library's traceback."""
        from safetensors import SafetensorError
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
        meta = _checked_meta(meta, path)
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a valid safetensors file: {error}") from None
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
        if not (math.isfinite(n) and n >= 1 and n == math.floor(n)):
            raise ValueError(f"{path}: count must be a positive integer, got {n}")
        if not (np.isfinite(mean).all() and np.isfinite(m2).all()) or (m2 < 0).any():
            raise ValueError(f"{path}: mean/m2 must be finite and m2 non-negative")
        try:
            stats = cls(
                mean.shape,
                kind=meta["kind"],
                encoder_digest=meta["encoder_digest"],
                source=meta["source"],
                created_by=meta["created_by"],
                max_samples=meta["max_samples"],
                version=meta["version"],
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        stats.parts = meta["parts"]
        stats.count = int(n)
        stats.mean = mean
        stats.m2 = m2
        if "samples" in tensors:
            samples, keys = tensors["samples"], tensors.get("sample_keys")
            if (
                keys is None
                or samples.ndim != 3
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


# the JSON 'meta' entry of a stats file: field -> (type, default when absent)
_META_FIELDS: dict[str, tuple[type, Any]] = {
    "kind": (str, None),
    "encoder_digest": (str, None),
    "source": (str, None),
    "version": (str, None),
    "created_by": (str, ""),
    "max_samples": (int, 0),
    "parts": (list, []),
}
_JSON_TYPES = {str: "string", int: "integer", list: "list"}


def _checked_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The 'meta' entry with every field present (defaults filled in) and of its type."""
    if not isinstance(meta, dict):
        raise ValueError(
            f"{path}: its 'meta' entry must be a JSON object, got {type(meta).__name__}"
        )
    checked = {}
    for name, (kind, default) in _META_FIELDS.items():
        value = meta.get(name, default)
        if value is None:
            raise ValueError(f"{path}: metadata lacks {name!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{path}: metadata {name!r} must be a JSON {_JSON_TYPES[kind]}, got {value!r:.60}"
            )
        checked[name] = value
    if checked["max_samples"] < 0:
        raise ValueError(
            f"{path}: metadata 'max_samples' must be >= 0, got {checked['max_samples']}"
        )
    for part in checked["parts"]:  # merged files: what each merged file held
        if not (
            isinstance(part, dict)
            and isinstance(part.get("source"), str)
            and isinstance(part.get("count"), int)
        ):
            raise ValueError(
                f"{path}: metadata 'parts' must be a list of objects with a 'source' string "
                f"and a 'count' integer, got {part!r:.60}"
            )
    return checked


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
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise ValueError(f"{path}: its __metadata__ must map names to strings")
    return metadata


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
    """Load a stats file (a path or a URL, read through this node's cache), refusing one
    made with another encoder or of the other kind."""
    stats = ConditioningStats.load(local_file(path, folder="stats"))
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
