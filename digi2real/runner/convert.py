"""``convert``: plan (or reopen) OUT, run the uncommitted shards (this rank's, on N nodes),
finalise once every shard is committed."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.data import fsio, ownership
from digi2real.data.attributes import MODEL_ESTIMATES, check_options, estimates_wanted
from digi2real.data.layout import OutLayout
from digi2real.data.node_cache import local_file
from digi2real.data.store import ObjectPath, check_readable, is_url, location
from digi2real.device import check_resources, resolve_device, resolve_dtype
from digi2real.face.stack import FaceStack
from digi2real.pipeline.domain_shift import DomainShift
from digi2real.runner.cost import estimate
from digi2real.runner.finalize import Summary, environment, finalize
from digi2real.runner.local import run_in_process, run_workers
from digi2real.runner.nodes import NodeSplit, node_split
from digi2real.runner.outcome import RunOutcome
from digi2real.runner.plan import Plan, attribute_models, make_plan, prepare_out
from digi2real.runner.shard import ShardResult
from digi2real.weights import open_weights, sha256_file, verify
from digi2real.weights.manifest import groups_for, lora_groups

logger = logging.getLogger(__name__)

# 112x112 JPEG at quality 95 plus manifest/embedding share: an assumption, printed as one
BYTES_PER_IMAGE = 6_000


class ConvertError(RuntimeError):
    pass


def derived_fields(config: Config) -> dict[str, Any]:
    """Digests that change the output although their paths may move (weights, stats, a LoRA,
    TAESD: optional components are outside the weights digest)."""
    weights = open_weights(config.weights) if config.weights else None
    derived: dict[str, Any] = {"weights_digest": weights.digest if weights else None}
    gen = config.generation
    lora = describe_lora(config, weights) if weights is not None else None
    if lora is not None:
        derived["lora_sha256"] = lora["sha256"]
    if gen.decoder == "tiny" and weights is not None:
        weights.require("taesd")
        derived["taesd_digest"] = weights.file_digest("taesd")
    if weights is not None and estimates_wanted(config):
        # optional files are outside the weights digest: a model fetched later must not
        # change a run's estimates halfway
        derived["attribute_models"] = {
            group: weights.file_digest(group) for group in MODEL_ESTIMATES if weights.has(group)
        }
    if config.shift.enabled:
        for name in ("real_stats", "synthetic_stats"):
            path = getattr(config.shift, name)
            derived[f"shift_{name}_sha256"] = (
                sha256_file(local_file(path, folder="stats")) if path else None
            )
    return derived


def describe_lora(config: Config, weights: Any) -> dict[str, Any] | None:
    """The LoRA a run fuses: its name (a weights component, or the file's name), sha256 and
    scale; None without one."""
    lora = config.generation.lora
    if lora is None:
        return None
    path = weights.lora_file(lora)
    component = lora if path != Path(lora).expanduser() else None
    return {
        "name": component or path.name,
        "component": component,
        "sha256": sha256_file(path),
        "scale": float(config.generation.lora_scale),
    }


@dataclass
class RankSummary:
    """What a rank of a multi-node run did when others still had shards to commit."""

    out: Path | ObjectPath
    split: NodeSplit
    ran: int
    waiting: int

    def lines(self) -> list[str]:
        return [
            f"{self.split}: {self.ran} shard(s) run here, {self.waiting} shard(s) of other "
            "ranks not committed yet",
            f"the rank that commits the last shard assembles {self.out}; re-running any rank "
            "resumes its shards and assembles the dataset once all are committed",
        ]


def absolute_paths(config: Config) -> Config:
    """``config`` with its local source paths (SRC, an attribute table) made absolute, as
    given from the working directory: what config.yaml records and the report reads later,
    from anywhere."""
    fields = {}
    for field in ("source.root", "source.attributes"):
        section, name = field.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and not is_url(value) and not os.path.isabs(value):
            fields[field] = os.path.abspath(value)
    return config.override(fields, where="config") if fields else config


def run_inputs(config: Config) -> dict[str, Path | ObjectPath]:
    """What a conversion reads besides SRC, by the name a user knows it by: none of it may lie
    inside OUT (:func:`~digi2real.data.ownership.check_apart`)."""
    inputs: dict[str, Path | ObjectPath] = {}
    if config.weights:
        inputs["--weights"] = location(config.weights)
    for name in ("real_stats", "synthetic_stats"):
        path = getattr(config.shift, name)
        if path:
            inputs[f"shift.{name}"] = location(path)
    lora = config.generation.lora
    if lora is not None and lora not in lora_groups():
        inputs["generation.lora"] = location(lora)
    return inputs


def check_apart(config: Config, out: Path | ObjectPath) -> None:
    """OUT neither is, holds nor lies inside SRC, and holds no other input of the run."""
    source = location(config.source.root) if config.source.root else None
    ownership.check_apart(out, source, run_inputs(config))


def check_storage(config: Config, out: Path | ObjectPath) -> None:
    """Object-store locations, before any work: SRC and the statistics readable, OUT
    writable (one-line StorageAccessError: unreachable, no bucket, denied, expired)."""
    if config.source.root:
        check_readable(location(config.source.root), "source")
    for name in ("real_stats", "synthetic_stats"):
        path = getattr(config.shift, name)
        if path and config.shift.enabled:
            check_readable(location(path), f"shift.{name}")
    if isinstance(out, ObjectPath):
        # the probe goes in the run state: ranks planning the same OUT look only outside it
        fsio.check_writable(out, "output", probe_folder=OutLayout(out).state)


@dataclass
class Progress:
    """The progress bar's figures: identities, images (the bar itself, with its ETA),
    accepted rate and generated images/s."""

    shard_sizes: dict[int, int]
    bar: Any = None
    accepted: int = 0
    generated: int = 0
    identities: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, result: ShardResult) -> None:
        self.accepted += result.accepted
        self.generated += result.generated
        self.identities += self.shard_sizes.get(result.shard, 0)
        if self.bar is not None:
            self.bar.update(result.accepted + result.rejected)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            rate = self.accepted / max(self.generated, 1)
            self.bar.set_postfix(
                ids=f"{self.identities}/{sum(self.shard_sizes.values())}",
                accepted=f"{rate:.0%}",
                img_s=f"{self.generated / elapsed:.2f}",
            )


def preflight(config: Config, out: Path, *, bench_file: str | Path | None = None) -> dict[str, Any]:
    """The plan and what a run needs, without generating. GPU-hours come from a ``digi2real
    bench`` result (``bench_file``, else the default one) that measured these settings, or are
    reported unknown (runner/cost.py)."""
    import onnxruntime

    check_options(config)
    check_apart(config, location(out))
    plan = make_plan(config)
    targets = plan.num_identities * config.interpolation.outputs_per_identity
    weights_check = verify(config.weights) if config.weights else None
    out = location(out)
    if isinstance(out, ObjectPath):
        free, writable = float("nan"), fsio.is_writable(out)
    else:
        probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        writable = fsio.is_writable(probe)
    device = resolve_device(config.run.device)
    live = "weights not usable"
    if weights_check is not None and weights_check.ok:
        faces = FaceStack(config, open_weights(config.weights), device=device)
        live = {"detector": faces.detector.providers, "recognizer": faces.embedder.providers}
    return {
        "identities": plan.num_identities,
        "source_images": plan.num_images,
        "shards": len(plan.shards),
        "targets": targets,
        "scan_errors": len(plan.errors),
        **estimate(config, out, targets, device, bench_file),
        "estimated_disk_gb": targets * BYTES_PER_IMAGE * (len(config.output.formats)) / 1e9,
        "estimated_disk_gb_source": f"assumed {BYTES_PER_IMAGE} bytes per image and format",
        "weights": "ok"
        if weights_check and weights_check.ok
        else (weights_check.problems if weights_check else "not set"),
        "torch_device": device,
        "onnxruntime_providers_live": live,
        "onnxruntime_providers_available": onnxruntime.get_available_providers(),
        "free_disk_gb": free / 1e9,
        "out_writable": writable,
    }


def engine_matches(built: Config, wanted: Config) -> bool:
    """Whether an Engine built from ``built`` behaves as one built from ``wanted``."""
    return (
        built.weights == wanted.weights
        and built.generation == wanted.generation
        and built.filter == wanted.filter
        and built.shift == wanted.shift
        and built.output.jpeg_quality == wanted.output.jpeg_quality
        and built.run.device == wanted.run.device
    )


def convert(
    config: Config,
    out: str | Path | ObjectPath,
    *,
    overwrite: bool = False,
    delete_foreign: bool = False,
    progress: bool = True,
    engine: Any = None,
) -> Summary | RankSummary:
    """``overwrite`` deletes what digi2real wrote in ``out`` and starts over; files it did not
    write make it refuse, unless ``delete_foreign`` (:mod:`~digi2real.data.ownership`).
    ``engine``: a loaded Engine to reuse for an in-process run (the Python API passes its
    own); used only when it was built from the same model-side settings as ``config``. On N
    nodes (:mod:`~digi2real.runner.nodes`), a rank that leaves shards of other ranks
    uncommitted returns a :class:`RankSummary` instead of the dataset's :class:`Summary`."""
    # 1. every check that can refuse, before OUT is touched: a refused run leaves OUT as it was
    out = location(out)
    config = absolute_paths(config).validate()
    check_options(config)
    check_apart(config, out)
    if delete_foreign and not overwrite:
        raise ValueError("--delete-foreign-files only goes with --overwrite")
    split = node_split(config)
    if split.multi and overwrite:
        raise ValueError(
            "--overwrite with several nodes: each rank would delete the others' work; delete "
            "OUT once, then start the ranks"
        )
    if split.multi and config.run.runner == "ray":
        raise ValueError("--runner ray places shards itself: run it once, without --num-nodes")
    if engine is not None and not engine_matches(engine.config, config):
        engine = None
    if config.weights is None:
        raise ValueError("no weights: pass --weights DIR (see `digi2real weights --help`)")
    check_storage(config, out)
    weights = open_weights(config.weights)
    devices = check_resources(config)
    # loaded once: the in-process engine uses it, config.yaml records its description
    shift = DomainShift.from_config(config.shift, weights.file_digest("encoder"))
    if config.run.runner == "ray":
        from digi2real.runner.ray import import_ray

        import_ray()
    derived = derived_fields(config)
    # 2. plan (the source is read before OUT is touched), or reopen OUT
    plan: Plan = prepare_out(
        out, config, derived, overwrite=overwrite, delete_foreign=delete_foreign
    )
    paths = OutLayout(out)
    committed = paths.committed()
    todo = [s for s in range(len(plan.shards)) if s not in committed and split.owns(s)]
    logger.info("%d shards planned, %d to run (%s)", len(plan.shards), len(todo), split)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(len(plan.shards[s]) for s in todo)
            * config.interpolation.outputs_per_identity,
            unit="img",
            desc="convert",
            dynamic_ncols=True,
        )
    tracker = Progress({s: len(plan.shards[s]) for s in todo}, bar)
    try:
        if config.run.runner == "ray":
            from digi2real.runner.ray import run_ray

            outcome: RunOutcome = run_ray(config, out, plan, todo, on_result=tracker)
        elif len(devices) > 1:
            outcome = run_workers(config, out, plan, todo, devices=devices, on_result=tracker)
        elif todo:
            device = devices[0] if devices else config.run.device
            outcome = run_in_process(
                config,
                out,
                plan,
                todo,
                device=device,
                on_result=tracker,
                engine=engine,
                shift=shift,
            )
        else:
            outcome = RunOutcome()
    finally:
        if bar is not None:
            bar.close()
    if outcome.failed:
        details = "\n  ".join(f"shard {s}: {e}" for s, e in sorted(outcome.failed.items()))
        raise ConvertError(
            f"{len(outcome.failed)} shard(s) failed after retries; committed shards are kept, "
            f"re-run the same command to retry them:\n  {details}"
        )
    if split.multi:
        waiting = len(plan.shards) - len(paths.committed())
        if waiting:
            return RankSummary(out, split, len(todo), waiting)
    device = resolve_device(config.run.device if not devices else "auto")
    env = environment(
        device, resolve_dtype(config.generation.dtype, device), config.generation.compile
    )
    # the licence chain and config.yaml list the files this run used, optional ones included
    gen = config.generation
    models = attribute_models(config) if estimates_wanted(config) else ()
    used = weights.files_for(groups_for(gen.lora, gen.decoder) + models)
    lora = describe_lora(config, weights)
    if lora is not None and lora["component"] is None:
        # a LoRA file of the user's: in the licence chain, its licence unknown to us
        used.append(
            {"path": lora["name"], "component": "lora (user file)", "sha256": lora["sha256"]}
        )
    manifest = {"profile": weights.profile, "digest": weights.digest, "files": used}
    description = shift.describe() if shift is not None else None
    summary = finalize(
        out, config, plan, weights_manifest=manifest, env=env, shift=description, lora=lora
    )
    summary.events = [f"shard {r.shard}: {e}" for r in outcome.results for e in r.events]
    if summary.images == 0 and summary.rejected == 0 and summary.errors:
        raise NothingUsableError(nothing_usable(out, summary))
    return summary


class NothingUsableError(ValueError):
    """A finished run in which no source image could be used (every one is an error row)."""


def nothing_usable(out: Path | ObjectPath, summary: Summary) -> str:
    """One line: no source image was usable, the most common reasons, where the rows are."""
    from digi2real.data.manifest import read_table

    paths = OutLayout(out)
    reasons = Counter(read_table(paths.errors, columns=["reason"]).column("reason").to_pylist())
    found = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    return (
        f"no source image could be used ({summary.errors} error(s): {found}); every one is "
        f"listed in {paths.errors}"
    )


def committed_shards(out: str | Path | ObjectPath) -> tuple[int, int]:
    """(committed, planned) shards of an OUT; (0, 0) before its plan is complete."""
    from digi2real.data.manifest import read_table

    paths = OutLayout(out)
    if not paths.run_json.is_file():
        return 0, 0
    shards = read_table(paths.plan, columns=["shard"]).column("shard").to_pylist()
    total = max(shards, default=-1) + 1
    return len({shard for shard in paths.committed() if shard < total}), total
