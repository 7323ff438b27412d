"""The shard function every runner calls: read -> embed -> plan -> generate -> filter -> write.

A shard's outputs depend only on (plan, shard index, config): not on the runner, the worker,
the batch size or which shards ran before it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from digi2real.config import Config
from digi2real.data import fsio, layout
from digi2real.data.images import encode_jpeg, load_image
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import (
    MANIFEST_SCHEMA,
    REJECTED_SCHEMA,
    error_table,
    read_table,
    write_npy,
    write_parquet,
)
from digi2real.data.node_cache import local_files
from digi2real.data.readers import ErrorRow, IdentitySource, apply_min_images
from digi2real.data.store import ObjectPath, location
from digi2real.data.writers import Sample
from digi2real.data.writers.imagefolder import ImageFolderWriter
from digi2real.face.align import align_at
from digi2real.face.images import embed_images
from digi2real.pipeline.identity_filter import Accepted, Pending, generate_with_retries
from digi2real.pipeline.interpolate import Target, plan_identity
from digi2real.runner import faults
from digi2real.version import __version__

logger = logging.getLogger(__name__)


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


class ShardRunner:
    """Executes shards with one :class:`~digi2real.runner.engine.Engine` (one model copy)."""

    def __init__(
        self,
        engine: Any,
        config: Config,
        out: Path | ObjectPath | str,
        source_root: Path | ObjectPath | str,
    ) -> None:
        self.engine = engine
        self.config = config
        self.out: Any = location(out)
        self.source_root: Any = location(source_root)
        self.layout = OutLayout(out)
        self.image_writer = ImageFolderWriter(out_dir=self.out)

    @classmethod
    def build(
        cls,
        config: Config,
        out: Path | ObjectPath | str,
        source_root: Path | ObjectPath | str,
        device: str,
        *,
        engine: Any = None,
        shift: Any = None,
    ) -> ShardRunner:
        """The shard function around ``engine``, or around a new model copy on ``device``
        (``shift``: the domain shift when the caller has loaded it)."""
        from digi2real.runner.engine import Engine

        if engine is None:
            engine = Engine.from_config(config, device=device, shift=shift)
        return cls(engine, config, out, source_root)

    # -- source side ---------------------------------------------------------------------------

    def _rel(self, path: Path | ObjectPath) -> str:
        return str(path.relative_to(self.source_root))

    def embed_sources(
        self, shard: int, identities: list[IdentitySource]
    ) -> tuple[dict[str, tuple[np.ndarray, list[str]]], list[ErrorRow]]:
        """Usable images' embeddings per identity, cached per shard."""
        cache = self.layout.cache(shard)
        if cache.is_file():
            table = read_table(cache).to_pylist()
        else:
            table = self._embed_uncached(identities)
            write_parquet(cache, pa.Table.from_pylist(table))
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

    def _embed_uncached(self, identities: list[IdentitySource]) -> list[dict[str, Any]]:
        identity_of = {self._rel(path): i.name for i in identities for path in i.files}
        files = [path for identity in identities for path in identity.files]
        # a remote SRC is read from this node's cache (fetched once, concurrently)
        readable = local_files(files, folder="source")
        return [
            {
                "identity": identity_of[outcome.name],
                "path": outcome.name,
                "stage": outcome.stage,
                "reason": outcome.reason,
                "embedding": None if outcome.embedding is None else outcome.embedding.tolist(),
            }
            for outcome in embed_images(
                self.engine,
                ((self._rel(path), local) for path, local in zip(files, readable, strict=True)),
            )
        ]

    def init_image(self, item: Pending) -> np.ndarray:
        """A target's init render (render-guided transfer) in the ArcFace frame at the
        generation resolution."""
        (path,) = local_files([self.source_root / item.init_path], folder="source")
        image = load_image(path)
        aligned = align_at(image, self.engine.detector, self.engine.generator.resolution)
        if aligned is None:  # it was embedded, so it had a face: only a detector change
            raise ValueError(f"{item.init_path}: no face to initialise {item.identity!r} from")
        return aligned

    # -- the shard -----------------------------------------------------------------------------

    def run(self, shard: int, identities: list[IdentitySource]) -> ShardResult:
        start = time.perf_counter()
        final = self.layout.shard(shard)
        result = ShardResult(shard)
        if self.layout.is_committed(shard):
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
                identity = fsio.safe_component(done.item.identity)
                fsio.atomic_write_bytes(
                    self.out
                    / layout.image_path(identity, done.item.target.index, layout.ORIGINALS),
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
            self.engine, pending, self.config, on_accept=write_image, init_image=self.init_image
        )
        faults.point("shard-generated", shard)
        faults.point("shard-images-written", shard)
        # CUDA OOM batch halvings during this shard, reported by the runner
        result.events.extend(self.engine.oom_events)
        self.engine.oom_events.clear()

        # each part is written under a temp name unique to this attempt and renamed in; the
        # manifest part goes last and is the commit marker (idempotent: same bytes each time)
        rows = [self._manifest_row(shard, done.item, done.similarity) for done in accepted]
        write_parquet(
            final / layout.ERRORS,
            error_table([dataclasses.replace(e, shard=shard) for e in errors]),
        )
        write_parquet(
            final / layout.REJECTED,
            pa.Table.from_pylist(
                [
                    self._rejected_row(shard, item)
                    for item in sorted(rejected, key=lambda p: (p.identity, p.target.index))
                ],
                schema=REJECTED_SCHEMA,
            ),
        )
        empty = np.zeros((0, self.engine.id_dim), np.float32)
        outputs = np.stack([a.face.embedding for a in accepted]) if accepted else empty
        targets = np.stack([a.item.target.embedding for a in accepted]) if accepted else empty
        write_npy(final / layout.OUTPUTS, outputs)
        write_npy(final / layout.TARGETS, targets)
        faults.point("shard-before-commit", shard)
        write_parquet(final / layout.MANIFEST, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
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
            "init_path": item.init_path if settings["init_strength"] > 0 else None,
            "init_strength": settings["init_strength"],
            "lora_digest": settings["lora_digest"],
            "decoder": settings["decoder"],
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
