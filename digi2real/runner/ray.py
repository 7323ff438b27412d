"""The Ray runner: a Ray Data pipeline over shard ids, one model copy per actor.

``convert --runner ray [--ray-address ADDR]`` builds a dataset of the shard ids still to run
(one block, one batch per shard) and maps it with :class:`ShardActor`, a callable class that
holds one :class:`~digi2real.runner.shard.ShardRunner` (``num_gpus=1`` per actor on GPU
clusters, ``run.torch_threads`` CPUs per actor otherwise). Every node must see the same
``OUT`` (a shared POSIX file system: commits are renames, which object stores do not have),
the source dataset and the weights at the same paths, and have digi2real installed.

Failure handling, and why it is not left to Ray:

- A shard's exception is caught inside the actor and returned as an error row: an uncaught
  error would fail the whole dataset, and Ray Data's own task retries stay on the same actor.
- An actor that dies loses its task; ``max_task_retries=0`` stops Ray from replaying it in
  place forever, ``max_restarts=-1`` refills the pool, and ``max_errored_blocks=-1`` lets the
  other shards go on. The driver sees which shards returned nothing.
- The driver resubmits the failed shards in a new pipeline, with new actors, up to
  ``run.max_shard_retries`` times, then reports them; a full or read-only output stops the
  run at once.

Ray may still run a shard twice (lineage reconstruction, a straggler of a failed round):
temporary names are unique per attempt and a shard's commit writes the same bytes each
time, so a second run of a committed shard is harmless.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.runner import faults
from digi2real.runner.outcome import RunOutcome, fatal_error, is_fatal
from digi2real.runner.plan import Plan, load_plan
from digi2real.runner.shard import ShardResult, ShardRunner

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'digi2real[ray]'"
LOST = "its Ray actor died (no result returned)"


class RayUnavailableError(RuntimeError):
    """``--runner ray`` without Ray installed."""


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the pipeline needs the data library, not only core
    except ImportError as error:
        raise RayUnavailableError(
            f"--runner ray needs Ray Data, which is not installed ({error}); install it with "
            f"{INSTALL_HINT}, or use the local runner (--devices 0,1 / all for several GPUs)"
        ) from error
    return ray


class ShardActor:
    """Ray Data callable class: builds one engine when the actor starts, then runs the
    shards of each batch; failures come back as rows, never as exceptions."""

    def __init__(self, config: dict[str, Any], out: str, device: str) -> None:
        self.config = Config.from_dict(config)
        self.plan = load_plan(Path(out), self.config)
        self.runner = ShardRunner.build(self.config, Path(out), self.plan.source_root, device)
        self.name = f"{socket.gethostname()}:{os.getpid()} ({device})"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [self.run_one(int(shard)) for shard in batch["shard"]]
        return {key: [row[key] for row in rows] for key in _FIELDS}

    def run_one(self, shard: int) -> dict[str, Any]:
        row = {"shard": shard, "worker": self.name, "result": "", "error": "", "errno": 0}
        try:
            result = self.runner.run(shard, self.plan.shards[shard])
        except Exception as error:  # noqa: BLE001 - one shard's failure must not end the dataset
            row["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            if is_fatal(error):
                row["errno"] = error.errno  # type: ignore[attr-defined]
            return row
        row["result"] = json.dumps(dataclasses.asdict(result))
        return row


_FIELDS = ("shard", "worker", "result", "error", "errno")


# restart dead actors to keep the pool full, but never replay a dead actor's task in place:
# Ray Data's default (max_task_retries=-1) would replay a shard that kills its actor forever.
# Ray 2.60 deprecates passing these (they have no named parameter yet); removed in 2.64.
ACTOR_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}


@dataclasses.dataclass
class Placement:
    gpu: bool
    actors: int
    cpus_per_actor: int


def placement(config: Config, resources: dict[str, float], shards: int) -> Placement:
    """GPU or CPU actors, and how many, from the config and the cluster's resources."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    device = config.run.device
    spec = config.run.devices
    gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if spec is not None and spec.startswith("cpu"):
        gpu = False
    if gpu and gpus == 0:
        raise ValueError(
            f"run.device={device!r} asks for GPUs, but the Ray cluster has none "
            f"(resources: {sorted(resources)}); use --device cpu"
        )
    threads = config.run.torch_threads
    if spec is None or spec == "all":
        actors = gpus if gpu else max(1, cpus // threads)
    elif spec.startswith("cpu"):
        _, _, count = spec.partition("x")
        actors = int(count or 1)
    else:
        # Ray assigns the GPUs itself; a list of ids only says how many actors to run
        actors = len([part for part in spec.split(",") if part.strip()])
    return Placement(gpu, max(1, min(actors, shards)), threads)


def run_ray(
    config: Config,
    out: Path,
    plan: Plan,
    shards: Iterable[int],
    *,
    on_result: Callable[[ShardResult], None] = lambda r: None,
) -> RunOutcome:
    """Run ``shards`` of ``plan`` on Ray; joins ``run.ray_address`` (or an already initialised
    Ray), else starts a local instance for the duration of the run."""
    ray = import_ray()
    outcome = RunOutcome()
    todo = list(shards)
    if not todo:
        return outcome
    started = False
    if not ray.is_initialized():
        ray.init(address=config.run.ray_address, include_dashboard=False)
        started = True
    context = ray.data.DataContext.get_current()
    saved = context.max_errored_blocks
    context.max_errored_blocks = -1  # a dead actor's block is skipped, not fatal to the rest
    try:
        where = placement(config, ray.cluster_resources(), len(todo))
        logger.info(
            "Ray: %d %s actor(s) for %d shard(s)",
            where.actors,
            "GPU" if where.gpu else "CPU",
            len(todo),
        )
        for round_index in range(config.run.max_shard_retries + 1):
            if not todo:
                break
            if round_index:
                logger.warning("Ray: resubmitting %d failed shard(s): %s", len(todo), todo)
            _run_round(ray, config, out, todo, where, outcome, on_result)
            todo = [shard for shard in todo if shard in outcome.failed]
    finally:
        context.max_errored_blocks = saved
        if started:
            ray.shutdown()
    return outcome


def _pipeline(ray: Any, config: Config, out: Path, shards: list[int], where: Placement) -> Any:
    """The dataset of ``shards`` mapped by :class:`ShardActor` (lazy: runs when iterated)."""
    env = faults.worker_environment()
    resources: dict[str, Any] = {"num_gpus": 1} if where.gpu else {"num_cpus": where.cpus_per_actor}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ray.data.from_items(
            [{"shard": shard} for shard in shards], override_num_blocks=len(shards)
        ).map_batches(
            ShardActor,
            fn_constructor_kwargs={
                "config": config.to_dict(),
                "out": str(out),
                "device": "cuda" if where.gpu else "cpu",
            },
            batch_size=1,
            # one shard in flight per actor, so an actor's death loses only that shard
            compute=ray.data.ActorPoolStrategy(size=where.actors, max_tasks_in_flight_per_actor=1),
            runtime_env={"env_vars": env} if env else None,
            **resources,
            **ACTOR_OPTIONS,
        )


def _run_round(
    ray: Any,
    config: Config,
    out: Path,
    shards: list[int],
    where: Placement,
    outcome: RunOutcome,
    on_result: Callable[[ShardResult], None],
) -> None:
    seen: set[int] = set()
    for row in _pipeline(ray, config, out, shards, where).iter_rows():
        shard = int(row["shard"])
        seen.add(shard)
        outcome.attempts.setdefault(shard, []).append(str(row["worker"]))
        if row["result"]:
            result = ShardResult(**json.loads(row["result"]))
            outcome.failed.pop(shard, None)
            outcome.results.append(result)
            on_result(result)
            continue
        error = str(row["error"])
        if row["errno"]:
            raise fatal_error(int(row["errno"]), error.splitlines()[0].partition(": ")[2])
        logger.warning("shard %d failed on %s: %s", shard, row["worker"], error)
        outcome.failed[shard] = error.splitlines()[0]
    for shard in shards:
        if shard not in seen:
            logger.warning("shard %d: %s", shard, LOST)
            outcome.attempts.setdefault(shard, []).append("lost")
            outcome.failed[shard] = LOST
