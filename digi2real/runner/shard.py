"""The shard function every runner calls: read -> embed -> plan -> generate -> filter -> write.

A shard's outputs depend only on (plan, shard index, config): not on the runner, the worker,
the batch size or which shards ran before it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from digi2real.config import Config
from digi2real.data import attributes as attrs
from digi2real.data import fsio, layout
from digi2real.data.images import encode_jpeg, load_image
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import (
    REJECTED_SCHEMA,
    error_table,
    manifest_schema,
    read_table,
    write_npy,
    write_parquet,
)
from digi2real.data.node_cache import local_files
from digi2real.data.readers import ErrorRow, IdentitySource, apply_min_images
from digi2real.data.store import ObjectPath, location
from digi2real.data.writers import Sample
from digi2real.data.writers.imagefolder import ImageFolderWriter
from digi2real.face import landmarks as geometry
from digi2real.face.align import align_at_with_matrix
from digi2real.face.images import embed_images
from digi2real.pipeline.identity_filter import Accepted, Pending, generate_with_retries
from digi2real.pipeline.interpolate import Target, plan_identity
from digi2real.runner import faults
from digi2real.runner.plan import attribute_models, load_attributes
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
        # init render path -> its map into the generation frame (render-guided transfer)
        self._render_frames: dict[str, np.ndarray] = {}

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
        self,
        shard: int,
        identities: list[IdentitySource],
        select: Callable[[list[str]], np.ndarray] | None = None,
    ) -> tuple[dict[str, tuple[np.ndarray, list[str]]], list[ErrorRow]]:
        """Usable images' embeddings per identity, cached per shard; ``select`` (usable paths
        -> a keep mask) drops images before the minimum-images rule counts them."""
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
        stage = "read"
        if select is not None:
            stage = "select"  # too few images satisfy --where
            paths = [path for _, names in usable.values() for path in names]
            keep = dict(zip(paths, select(paths).tolist(), strict=True))
            usable = {
                name: (
                    [e for e, p in zip(*pair, strict=True) if keep[p]],
                    [p for p in pair[1] if keep[p]],
                )
                for name, pair in usable.items()
            }
        counts = {name: len(v[1]) for name, v in usable.items()}
        kept, too_few = apply_min_images(
            identities, counts, self.config.source.min_images, stage=stage
        )
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
        generation resolution; the map into that frame is kept for the render's labels."""
        (path,) = local_files([self.source_root / item.init_path], folder="source")
        image = load_image(path)
        aligned, matrix = align_at_with_matrix(
            image, self.engine.detector, self.engine.generator.resolution
        )
        if aligned is None:  # it was embedded, so it had a face: only a detector change
            raise ValueError(f"{item.init_path}: no face to initialise {item.identity!r} from")
        self._render_frames[item.init_path] = matrix
        return aligned

    # -- attributes ----------------------------------------------------------------------------

    @functools.cached_property
    def control(self) -> attrs.Control:
        """The run's attribute options over its planned ground truth."""
        attributes, edges = load_attributes(self.out)
        return attrs.resolve_control(self.config, attributes, edges, attribute_models(self.config))

    @functools.cached_property
    def attribute_models(self) -> Any:
        """The optional attribute models the run uses (None: none), on the engine's device."""
        if not self.control.models:
            return None
        from digi2real.face.attribute_models import AttributeModels

        return AttributeModels(self.engine.weights, self.engine.device)

    def estimates(self, shard: int, paths: list[str]) -> dict[str, dict[str, Any]]:
        """Every ``*_est`` attribute of the shard's usable images, cached per shard."""
        from digi2real.face.estimates import estimate_attributes

        cache = self.layout.estimates_cache(shard)
        if cache.is_file():
            rows = read_table(cache).to_pylist()
            found = {row.pop("path"): row for row in rows}
            names = set(self.control.estimate_names)
            if set(paths) <= set(found) and all(names <= set(row) for row in found.values()):
                return found
        found = {}
        readable = local_files([self.source_root / p for p in paths], folder="source")
        for relative, local in zip(paths, readable, strict=True):
            found[relative] = estimate_attributes(
                load_image(local), self.engine.detector, self.attribute_models
            )
        table = pa.table(
            {
                "path": pa.array(sorted(found), pa.string()),
                **{
                    name: pa.array([found[p][name] for p in sorted(found)], pa.float64())
                    for name in self.control.estimate_names
                },
            }
        )
        write_parquet(cache, table)
        return found

    def source_values(self, shard: int, paths: list[str]) -> dict[str, np.ndarray]:
        """Every scalar attribute of ``paths`` as ``--where`` reads it (estimates included
        when the run estimates)."""
        control = self.control
        columns = {
            name: attrs.column_values(control.attributes, name, paths)
            for name in control.attributes.names
        }
        if control.estimates:
            found = self.estimates(shard, paths)
            for name in control.estimate_names:
                columns[name] = np.array(
                    [np.nan if found[p][name] is None else found[p][name] for p in paths],
                    np.float64,
                )
        return columns

    def _selector(self, shard: int, values: dict[str, dict[str, Any]]) -> Callable:
        """``select`` for :meth:`embed_sources`: the images ``--where`` keeps; fills
        ``values`` (path -> scalar attributes) for every usable image on the way."""
        control = self.control

        def select(paths: list[str]) -> np.ndarray:
            columns = self.source_values(shard, paths)
            for i, path in enumerate(paths):
                values[path] = {name: _plain(column[i]) for name, column in columns.items()}
            if control.where is None:
                return np.ones(len(paths), dtype=bool)
            return control.where.evaluate(columns, len(paths))

        return select

    def carry(
        self, item: Pending, face: Any, values: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, Any], bytes | None, np.ndarray]:
        """What an accepted output carries: its manifest columns (its dominant render's
        attributes; landmarks and the render->output map when geometry is kept; label
        fidelity), its mask sidecar's PNG (or None), and the image it is written as."""
        from digi2real.face.pose import estimate_pose

        control = self.control
        source = item.init_path
        row: dict[str, Any] = {
            name: values.get(source, {}).get(name) for name in control.scalar_names
        }
        row[attrs.ATTRIBUTES_FROM] = source
        generation_frame = self.config.output.frame == "generation"
        image = face.image if generation_frame else face.crop
        to_output = geometry.identity_matrix() if generation_frame else face.matrix
        detected = None
        if face.kps is not None and to_output is not None:
            detected = geometry.apply(to_output, face.kps)
        mask_png = None
        if control.geometry:
            row.update({attrs.LANDMARKS: None, attrs.LABEL_MATRIX: None, attrs.NME: None})
            render_frame = self._render_frames.get(source)
            if render_frame is not None and to_output is not None:
                matrix = geometry.compose(render_frame, to_output)
                row[attrs.LABEL_MATRIX] = matrix.ravel().tolist()
                points = control.attributes.landmarks.get(source)
                if points is not None:
                    carried = geometry.apply(matrix, points)
                    row[attrs.LANDMARKS] = carried.tolist()
                    if detected is not None:
                        row[attrs.NME] = geometry.nme(detected, carried)
                mask = control.attributes.segmentation.get(source)
                if mask is not None:
                    mask_png = self._warped_mask(mask, matrix, image.shape[1::-1])
        yaw = pitch = None
        if face.kps is not None:
            yaw, pitch = estimate_pose(face.kps)
        row[attrs.OUTPUT_YAW], row[attrs.OUTPUT_PITCH] = yaw, pitch
        return row, mask_png, image

    def _warped_mask(self, relative: str, matrix: np.ndarray, size: tuple[int, int]) -> bytes:
        import cv2

        from digi2real.data.labelled import read_mask

        (local,) = local_files([self.source_root / relative], folder="source")
        mask = read_mask(Path(local).parent, Path(local).name)
        ok, encoded = cv2.imencode(".png", geometry.warp_mask(mask, matrix, size))
        if not ok:
            raise ValueError(f"{relative}: the carried mask could not be encoded")
        return encoded.tobytes()

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
        control = self.control
        values: dict[str, dict[str, Any]] = {}  # usable path -> its scalar attributes
        select = self._selector(shard, values) if control.active else None
        sources, errors = self.embed_sources(shard, identities, select)
        faults.point("shard-embedded", shard)
        pending: list[Pending] = []
        targets: dict[str, list[Target]] = {}
        for name in sorted(sources):
            embeddings, paths = sources[name]
            bins = None
            if control.balance is not None and control.edges is not None:
                column = [values[p].get(control.balance.column) for p in paths]
                bins = attrs.bin_index(
                    np.array([np.nan if v is None else v for v in column], np.float64),
                    control.edges,
                )
            targets[name] = plan_identity(
                name, embeddings, self.config.interpolation, self.config.run.seed, bins
            )
            for target in targets[name]:
                pending.append(Pending(name, target, [paths[i] for i in target.sources]))

        keep_original = self.config.output.keep_original
        quality = self.config.output.jpeg_quality
        carried: dict[tuple[str, int], dict[str, Any]] = {}

        def write_image(done: Accepted) -> None:
            # atomic and deterministic: an uncommitted shard's images are rewritten (or, if
            # no longer accepted, removed at finalisation) when the shard is redone
            data = done.face.jpeg
            if control.active or self.config.output.frame == "generation":
                extra, mask_png, image = self.carry(done.item, done.face, values)
                if self.config.output.frame == "generation":
                    data = encode_jpeg(image, quality=quality)
                if control.active:
                    carried[(done.item.identity, done.item.target.index)] = extra
                    self._write_sidecars(done.item, extra, mask_png)
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
                    data=data,
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
        rows = [
            {
                **self._manifest_row(shard, done.item, done.similarity),
                **carried.get((done.item.identity, done.item.target.index), {}),
            }
            for done in accepted
        ]
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
        schema = manifest_schema(control.fields())
        write_parquet(final / layout.MANIFEST, pa.Table.from_pylist(rows, schema=schema))
        faults.point("shard-committed", shard)
        result.accepted = len(accepted)
        result.rejected = len(rejected)
        result.errors = len(errors)
        result.seconds = time.perf_counter() - start
        return result

    def _write_sidecars(self, item: Pending, extra: dict[str, Any], mask_png: bytes | None) -> None:
        identity = fsio.safe_component(item.identity)
        index = item.target.index
        text = json.dumps(
            {k: v for k, v in extra.items() if k != attrs.LABEL_MATRIX or v is not None},
            sort_keys=True,
            allow_nan=False,
        )
        fsio.atomic_write_bytes(
            self.out / layout.image_path(identity, index, layout.ANNOTATIONS, layout.SIDECAR_JSON),
            (text + "\n").encode("utf-8"),
        )
        if mask_png is not None:
            fsio.atomic_write_bytes(
                self.out
                / layout.image_path(identity, index, layout.ANNOTATIONS, layout.SIDECAR_MASK),
                mask_png,
            )

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


def _plain(value: Any) -> Any:
    """A column cell as a JSON-able Python value (NaN: missing)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
