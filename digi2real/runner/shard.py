"""The shard function every runner calls: read -> embed -> plan -> generate -> filter -> write.

A shard's outputs depend only on (plan, shard index, config): not on the runner, the worker,
the batch size or which shards ran before it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digi2real import __version__, faults
from digi2real.config import Config
from digi2real.data import fsio
from digi2real.data.images import ImageError, encode_jpeg, load_image
from digi2real.data.readers import ErrorRow, IdentitySource, apply_min_images
from digi2real.data.writers import ImageFolderWriter, Sample
from digi2real.interpolate import Target, image_seed, plan_identity
from digi2real.runner.engine import GeneratedFace
from digi2real.runner.plan import error_table, shard_dir, state_dir

logger = logging.getLogger(__name__)

ORIGINALS = "originals"  # optional full-resolution copies, same layout as images/

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("identity", pa.string()),
        ("label", pa.int64()),
        ("path", pa.string()),
        ("index", pa.int64()),
        ("attempt", pa.int64()),
        ("seed", pa.int64()),
        ("interp_kind", pa.string()),
        ("source_paths", pa.list_(pa.string())),
        ("interp_weights", pa.list_(pa.float64())),
        ("sampler", pa.string()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("dtype", pa.string()),
        ("shift_method", pa.string()),
        ("shift_alpha", pa.float64()),
        ("similarity", pa.float64()),
        ("shard", pa.int64()),
        ("weights_digest", pa.string()),
        ("version", pa.string()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),
        ("index", pa.int64()),
        ("attempts", pa.int64()),
        ("seeds", pa.list_(pa.int64())),
        ("best_similarity", pa.float64()),
        ("reason", pa.string()),
        ("interp_kind", pa.string()),
        ("source_paths", pa.list_(pa.string())),
        ("interp_weights", pa.list_(pa.float64())),
        ("shard", pa.int64()),
    ]
)


@dataclass
class ShardResult:
    shard: int
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    generated: int = 0  # diffusion samples run (attempts included)
    skipped: bool = False  # already committed
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)


@dataclass
class Pending:
    identity: str
    target: Target
    source_paths: list[str]
    attempt: int = 0
    seeds: list[int] = field(default_factory=list)
    best: float = -2.0
    reason: str = ""


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


@dataclass
class Accepted:
    item: Pending
    similarity: float
    face: GeneratedFace


def generate_with_retries(
    engine: Any,
    pending: list[Pending],
    config: Config,
    on_accept: Callable[[Accepted], None] | None = None,
) -> tuple[list[Accepted], list[Pending], int]:
    """Generate every pending target; a target whose output misses the identity threshold (or
    has no face) is retried with the next derived seed, up to ``filter.max_attempts``.
    ``on_accept`` sees each accepted image as soon as its batch is post-processed (while the
    next batch diffuses)."""
    accepted: list[Accepted] = []
    rejected: list[Pending] = []
    generated = 0
    threshold = config.filter.threshold
    while pending:
        for item in pending:
            item.seeds.append(
                image_seed(config.run.seed, item.identity, item.target.index, item.attempt)
            )
        decided: dict[int, Accepted | None] = {}

        def decide(
            offset: int,
            faces: list[GeneratedFace],
            batch: list[Pending] = pending,
            decided: dict[int, Accepted | None] = decided,
        ) -> None:
            for i, face in enumerate(faces):
                item = batch[offset + i]
                if face.embedding is None:
                    item.reason = face.reason
                    decided[offset + i] = None
                    continue
                similarity = float(np.dot(face.embedding, item.target.embedding))
                if similarity >= threshold:
                    decided[offset + i] = done = Accepted(item, similarity, face)
                    if on_accept is not None:
                        on_accept(done)
                else:
                    item.best = max(item.best, similarity)
                    item.reason = f"similarity below {threshold}"
                    decided[offset + i] = None

        engine.generate(
            np.stack([p.target.embedding for p in pending]),
            [p.seeds[-1] for p in pending],
            on_faces=decide,
        )
        generated += len(pending)
        retry: list[Pending] = []
        for i, item in enumerate(pending):
            done = decided[i]
            if done is not None:
                accepted.append(done)
                continue
            item.attempt += 1
            (retry if item.attempt < config.filter.max_attempts else rejected).append(item)
        pending = retry
    accepted.sort(key=lambda a: (a.item.identity, a.item.target.index))
    rejected.sort(key=lambda p: (p.identity, p.target.index))
    return accepted, rejected, generated


class ShardRunner:
    """Executes shards with one :class:`~digi2real.engine.Engine` (one model copy)."""

    def __init__(self, engine: Any, config: Config, out: Path, source_root: Path) -> None:
        self.engine = engine
        self.config = config
        self.out = Path(out)
        self.source_root = Path(source_root)
        self.image_writer = ImageFolderWriter(out_dir=self.out)

    # -- source side ---------------------------------------------------------------------------

    def _rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.source_root))

    def embed_sources(
        self, shard: int, identities: list[IdentitySource]
    ) -> tuple[dict[str, tuple[np.ndarray, list[str]]], list[ErrorRow]]:
        """Usable images' embeddings per identity, cached per shard."""
        cache = state_dir(self.out) / "cache" / f"shard-{shard:06d}.parquet"
        if cache.is_file():
            table = pq.read_table(cache).to_pylist()
        else:
            table = self._embed_uncached(shard, identities)
            cache.parent.mkdir(parents=True, exist_ok=True)
            fsio.atomic_write_bytes(cache, _parquet_bytes(pa.Table.from_pylist(table)))
        errors: list[ErrorRow] = []
        usable: dict[str, tuple[list[np.ndarray], list[str]]] = {
            i.name: ([], []) for i in identities
        }
        for row in table:
            if row["reason"]:
                errors.append(
                    ErrorRow(row["path"], row["identity"], row["stage"], row["reason"], shard)
                )
            else:
                usable[row["identity"]][0].append(np.asarray(row["embedding"], dtype=np.float32))
                usable[row["identity"]][1].append(row["path"])
        counts = {name: len(v[1]) for name, v in usable.items()}
        kept, too_few = apply_min_images(identities, counts, self.config.source.min_images)
        errors.extend(dataclasses.replace(e, shard=shard) for e in too_few)
        result = {i.name: (np.stack(usable[i.name][0]), usable[i.name][1]) for i in kept}
        return result, errors

    def _embed_uncached(self, shard: int, identities: list[IdentitySource]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        crops: list[np.ndarray] = []
        crop_rows: list[int] = []
        for identity in identities:
            for path in identity.files:
                rel = self._rel(path)
                row = {
                    "identity": identity.name,
                    "path": rel,
                    "stage": "",
                    "reason": "",
                    "embedding": None,
                }
                try:
                    image = load_image(path)
                except ImageError as error:
                    detail = f": {error.detail}" if error.detail else ""
                    row.update(stage="read", reason=error.reason + detail)
                    rows.append(row)
                    continue
                crop, why = self.engine.align(image)
                if crop is None:
                    row.update(stage="detect", reason=why)
                else:
                    crop_rows.append(len(rows))
                    crops.append(crop)
                rows.append(row)
        if crops:
            embeddings = self.engine.embed(np.stack(crops))
            for index, embedding in zip(crop_rows, embeddings, strict=True):
                rows[index]["embedding"] = embedding.tolist()
        return rows

    # -- the shard -----------------------------------------------------------------------------

    def run(self, shard: int, identities: list[IdentitySource]) -> ShardResult:
        start = time.perf_counter()
        final = shard_dir(self.out, shard)
        result = ShardResult(shard)
        if (final / "manifest.parquet").is_file():
            result.skipped = True
            return result
        faults.point("shard-start", shard)
        # leftovers of a killed attempt of this shard (never read; a Ray duplicate attempt
        # running concurrently would only lose temp files it re-creates on its next write)
        fsio.remove_stale_temps(final)
        sources, errors = self.embed_sources(shard, identities)
        faults.point("shard-embedded", shard)
        pending: list[Pending] = []
        targets: dict[str, list[Target]] = {}
        for name in sorted(sources):
            embeddings, paths = sources[name]
            targets[name] = plan_identity(
                name, embeddings, self.config.interpolation, self.config.run.seed
            )
            for target in targets[name]:
                pending.append(Pending(name, target, [paths[i] for i in target.sources]))

        keep_original = self.config.output.keep_original
        quality = self.config.output.jpeg_quality

        def write_image(done: Accepted) -> None:
            # atomic and deterministic: an uncommitted shard's images are rewritten (or, if
            # no longer accepted, removed at finalisation) when the shard is redone
            if keep_original:
                relative = ImageFolderWriter.relative_path(
                    done.item.identity, done.item.target.index
                )
                fsio.atomic_write_bytes(
                    self.out / ORIGINALS / Path(relative).relative_to("images"),
                    encode_jpeg(done.face.image, quality=quality),
                )
            self.image_writer.write(
                Sample(
                    key="",
                    label=-1,
                    identity=done.item.identity,
                    index=done.item.target.index,
                    shard=shard,
                    data=done.face.jpeg,
                    meta={},
                )
            )

        accepted, rejected, result.generated = generate_with_retries(
            self.engine, pending, self.config, on_accept=write_image
        )
        faults.point("shard-generated", shard)
        faults.point("shard-images-written", shard)
        # CUDA OOM batch halvings during this shard, reported by the runner
        result.events.extend(self.engine.oom_events)
        self.engine.oom_events.clear()

        # each part is written under a temp name unique to this attempt and renamed in; the
        # manifest part goes last and is the commit marker (idempotent: same bytes each time)
        final.mkdir(parents=True, exist_ok=True)
        rows = [self._manifest_row(shard, done.item, done.similarity) for done in accepted]
        parts = {
            "errors.parquet": error_table([dataclasses.replace(e, shard=shard) for e in errors]),
            "rejected.parquet": pa.Table.from_pylist(
                [
                    self._rejected_row(shard, item)
                    for item in sorted(rejected, key=lambda p: (p.identity, p.target.index))
                ],
                schema=REJECTED_SCHEMA,
            ),
        }
        for name, table in parts.items():
            fsio.atomic_write_bytes(final / name, _parquet_bytes(table))
        dim = self.engine.id_dim
        empty = np.zeros((0, dim), np.float32)
        outputs_arr = np.stack([a.face.embedding for a in accepted]) if accepted else empty
        targets_arr = np.stack([a.item.target.embedding for a in accepted]) if accepted else empty
        for name, array in (("outputs.npy", outputs_arr), ("targets.npy", targets_arr)):
            buffer = io.BytesIO()
            np.save(buffer, array.astype(np.float32))
            fsio.atomic_write_bytes(final / name, buffer.getvalue())
        faults.point("shard-before-commit", shard)
        fsio.atomic_write_bytes(
            final / "manifest.parquet",
            _parquet_bytes(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)),
        )
        faults.point("shard-committed", shard)
        result.accepted = len(accepted)
        result.rejected = len(rejected)
        result.errors = len(errors)
        result.seconds = time.perf_counter() - start
        return result

    def _manifest_row(self, shard: int, item: Pending, similarity: float) -> dict[str, Any]:
        settings = self.engine.describe()
        return {
            "key": "",
            "identity": item.identity,
            "label": -1,
            "path": ImageFolderWriter.relative_path(item.identity, item.target.index),
            "index": item.target.index,
            "attempt": item.attempt,
            "seed": item.seeds[-1],
            "interp_kind": item.target.kind,
            "source_paths": item.source_paths,
            "interp_weights": list(item.target.weights),
            "sampler": settings["sampler"],
            "steps": settings["steps"],
            "guidance": settings["guidance"],
            "dtype": settings["dtype"],
            "shift_method": settings["shift_method"],
            "shift_alpha": settings["shift_alpha"],
            "similarity": similarity,
            "shard": shard,
            "weights_digest": settings["weights_digest"],
            "version": __version__,
        }

    def _rejected_row(self, shard: int, item: Pending) -> dict[str, Any]:
        return {
            "identity": item.identity,
            "index": item.target.index,
            "attempts": item.attempt,
            "seeds": item.seeds,
            "best_similarity": item.best if item.best > -2 else None,
            "reason": item.reason,
            "interp_kind": item.target.kind,
            "source_paths": item.source_paths,
            "interp_weights": list(item.target.weights),
            "shard": shard,
        }
