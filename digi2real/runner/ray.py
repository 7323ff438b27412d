"""The Ray runner: a Ray Data pipeline over shard ids, one model copy per actor.

``convert --runner ray [--ray-address ADDR]`` builds a dataset of the shard ids still to run
(one block, one batch per shard) and maps it with :class:`ShardActor`, a callable class that
holds one :class:`~digi2real.runner.shard.ShardRunner` (``num_gpus=1`` per actor on GPU
clusters, ``run.torch_threads`` CPUs per actor otherwise). Actors read SRC and write OUT
through :mod:`digi2real.data.store`: a shared file system at the same path on every node, or
object-store URLs (no shared storage at all). The weights are a local path present on every
node or a URL fetched once per node into its cache; every node has digi2real installed.

Failure handling (only named ``map_batches`` parameters and ``DataContext`` settings; Ray
Data's actor pool keeps its defaults, ``max_restarts=-1`` and ``max_task_retries=-1``):

- A shard's exception is caught inside the actor and returned as an error row: an uncaught
  error would fail the whole dataset. The driver resubmits the shards that raised in a new
  pipeline, with new actors, up to ``run.max_shard_retries`` times, then reports them.
- An actor that dies (segfault, OOM kill, a lost node) is restarted by Ray and its shard run
  again, on that restarted actor. Ray would do so forever, so the attempts are bounded here:
  before running a shard an actor creates the shard's next attempt marker in
  ``OUT/.digi2real/attempts/<run token>/`` (exclusively: two actors never get the same
  attempt), and once a shard has had ``run.max_shard_retries + 1`` attempts it returns an
  error row instead of running it. The token is new for each run, so a resume counts afresh;
  the markers are removed when the run ends. ``max_errored_blocks=-1`` lets the other shards
  go on should a block still fail.
- An actor that raises while loading its models returns an error row for each shard it is
  given (they go round again, with new actors, as above); one that dies while loading is
  restarted by Ray, again a bounded number of times: every start claims an
  ``actor-start.<k>`` marker beside the attempt markers (and a ``.loaded`` one once its
  models are loaded), and once ``run.max_shard_retries + 1`` starts per actor of the pool
  died or failed loading, an actor starts without models and refuses its shards.
- A full, read-only or denied output stops the run at once.

Ray may still run a shard twice (lineage reconstruction, a straggler of a failed round):
temporary names are unique per attempt and a shard's commit writes the same bytes each
time, so a second run of a committed shard is harmless (and is not refused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.data import fsio, layout
from digi2real.data.layout import OutLayout
from digi2real.data.store import ObjectPath, location
from digi2real.device import set_threads
from digi2real.runner import faults
from digi2real.runner.outcome import RunOutcome, fatal_error, is_fatal
from digi2real.runner.plan import Plan, load_plan
from digi2real.runner.shard import ShardResult, ShardRunner

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'digi2real[ray]'"
LOST = "its Ray actor died (no result returned)"
# an attempt that never returned: its actor died, and Ray ran the shard again once restarted
DIED = "died"
EXHAUSTED = "gave up after {attempts} attempt(s): its Ray actor died running it (segfault, OOM kill, lost node?)"
STARTS_EXHAUSTED = "gave up after {starts} actor start(s): actors died loading their models"


class RayUnavailableError(ImportError):
    """``--runner ray`` without Ray installed (an ImportError: the CLI's usage error, fixed by
    installing the extra)."""


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

    def __init__(
        self, config: dict[str, Any], out: str, device: str, run_token: str, actors: int = 1
    ) -> None:
        # an actor is a worker: the driver's log level, a fixed torch thread count
        faults.configure_worker_logging()
        self.config = Config.from_dict(config)
        set_threads(self.config.run.torch_threads)
        self.name = f"{socket.gethostname()}:{os.getpid()} ({device})"
        self.attempts = attempts_folder(location(out), run_token)
        self.max_attempts = self.config.run.max_shard_retries + 1
        self.runner: ShardRunner | None = None
        self.start_error = ""
        # Ray restarts an actor that dies here, forever: loads that never finished are counted
        start = claim_start(self.attempts, self.max_attempts * actors, self.name)
        if start is None:
            self.start_error = STARTS_EXHAUSTED.format(starts=self.max_attempts * actors)
            return
        try:
            faults.point("worker-start")
            self.plan = load_plan(location(out), self.config)
            self.runner = ShardRunner.build(self.config, out, self.plan.source_root, device)
        except Exception as error:  # noqa: BLE001 - reported per shard; the driver decides
            if is_fatal(error):
                raise
            self.start_error = f"actor start failed: {type(error).__name__}: {error}"
            logger.warning("%s: %s", self.name, self.start_error)
            return
        fsio.create_exclusive(start.with_name(start.name + LOADED), self.name.encode())

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = [self.run_one(int(shard)) for shard in batch["shard"]]
        return {key: [row[key] for row in rows] for key in _FIELDS}

    def run_one(self, shard: int) -> dict[str, Any]:
        row = {
            "shard": shard,
            "worker": self.name,
            "result": "",
            "error": "",
            "errno": 0,
            "attempt": 0,
            "refused": False,
        }
        if self.runner is None:
            row["error"] = self.start_error
            return row
        try:
            # a committed shard is only skipped, whatever its attempts (a Ray duplicate)
            if not self.runner.layout.is_committed(shard):
                attempt = claim_attempt(self.attempts, shard, self.max_attempts, self.name)
                if attempt is None:
                    logger.warning("shard %d: no attempt left, not running it", shard)
                    row["error"] = EXHAUSTED.format(attempts=self.max_attempts)
                    row["refused"] = True
                    return row
                row["attempt"] = attempt
            result = self.runner.run(shard, self.plan.shards[shard])
        except Exception as error:  # noqa: BLE001 - one shard's failure must not end the dataset
            row["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            if is_fatal(error):
                row["errno"] = error.errno  # type: ignore[attr-defined]
            return row
        row["result"] = json.dumps(dataclasses.asdict(result))
        return row


_FIELDS = ("shard", "worker", "result", "error", "errno", "attempt", "refused")
START = "actor-start"  # an actor's model loads, counted beside the shards' attempts
LOADED = ".loaded"


def attempts_folder(out: Path | ObjectPath, run_token: str) -> Any:
    """Where one run's attempt markers go (one file per attempt of a shard)."""
    return OutLayout(out).state / layout.ATTEMPTS / run_token


def attempt_marker(folder: Any, shard: int, attempt: int) -> Any:
    return folder / f"{shard:06d}.{attempt}"


def claim_start(folder: Any, max_failed: int, owner: str) -> Any:
    """The marker of an actor start about to load models (``actor-start.<k>``, created
    exclusively), or None when ``max_failed`` starts already died or failed before their
    ``.loaded`` marker: Ray restarts an actor that dies while loading, without end."""
    names = [p.name for p in folder.glob(f"{START}.*")] if folder.exists() else []
    starts = [n for n in names if not n.endswith(LOADED)]
    if len(starts) - (len(names) - len(starts)) >= max_failed:
        return None
    number = len(starts) + 1
    while not fsio.create_exclusive(folder / f"{START}.{number}", owner.encode()):
        number += 1
    return folder / f"{START}.{number}"


def claim_attempt(folder: Any, shard: int, max_attempts: int, owner: str) -> int | None:
    """The number (1, 2, ...) of the attempt of ``shard`` about to start, recorded by creating
    its marker exclusively (holding ``owner``, for a human), or None when ``shard`` has had
    ``max_attempts`` already. Markers are never removed during a run: an attempt whose actor
    died still counts."""
    for attempt in range(1, max_attempts + 1):
        if fsio.create_exclusive(attempt_marker(folder, shard, attempt), owner.encode()):
            return attempt
    return None


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
    out: Path | ObjectPath,
    plan: Plan,
    shards: Iterable[int],
    *,
    on_result: Callable[[ShardResult], None] = lambda r: None,
) -> RunOutcome:
    """Run ``shards`` of ``plan`` on Ray; joins ``run.ray_address`` (or an already initialised
    Ray), else what ``ray.init()`` finds (``RAY_ADDRESS``, or a cluster ``ray start`` started on
    this machine), else starts a local instance for the duration of the run."""
    ray = import_ray()
    outcome = RunOutcome()
    todo = list(shards)
    if not todo:
        return outcome
    max_attempts = config.run.max_shard_retries + 1
    run_token = secrets.token_hex(8)
    out = location(out)
    attempts_root = OutLayout(out).state / layout.ATTEMPTS
    started = False
    if not ray.is_initialized():
        ray.init(address=config.run.ray_address, include_dashboard=False)
        started = True
    context = ray.data.DataContext.get_current()
    saved = context.max_errored_blocks
    context.max_errored_blocks = -1  # a failed block is skipped, not fatal to the other shards
    try:
        # markers of a killed driver: its Ray job, and the actors that could still write
        # there, ended with it; they are never read (another token), only clutter
        fsio.remove_tree(attempts_root)
        fsio.make_dirs(attempts_folder(out, run_token))
        where = placement(config, ray.cluster_resources(), len(todo))
        logger.info(
            "Ray: %d %s actor(s) for %d shard(s)",
            where.actors,
            "GPU" if where.gpu else "CPU",
            len(todo),
        )
        for round_index in range(max_attempts):
            if not todo:
                break
            if round_index:
                logger.warning("Ray: resubmitting %d failed shard(s): %s", len(todo), todo)
            _run_round(ray, config, out, run_token, todo, where, outcome, on_result)
            # a shard that raised goes round again while it has attempts left; Ray itself
            # re-ran those whose actor died, and their markers counted every run
            todo = [
                shard
                for shard in todo
                if shard in outcome.failed and len(outcome.attempts[shard]) < max_attempts
            ]
    finally:
        context.max_errored_blocks = saved
        # the run's attempt markers are never part of the output
        with contextlib.suppress(OSError):
            fsio.remove_tree(attempts_root)
        if started:
            ray.shutdown()
    return outcome


def _pipeline(
    ray: Any,
    config: Config,
    out: Path | ObjectPath,
    run_token: str,
    shards: list[int],
    where: Placement,
) -> Any:
    """The dataset of ``shards`` mapped by :class:`ShardActor` (lazy: runs when iterated)."""
    env = faults.worker_environment()
    return ray.data.from_items(
        [{"shard": shard} for shard in shards], override_num_blocks=len(shards)
    ).map_batches(
        ShardActor,
        fn_constructor_kwargs={
            "config": config.to_dict(),
            "out": str(out),
            "device": "cuda" if where.gpu else "cpu",
            "run_token": run_token,
            "actors": where.actors,
        },
        batch_size=1,
        # one shard in flight per actor, so an actor's death loses only that shard
        compute=ray.data.ActorPoolStrategy(size=where.actors, max_tasks_in_flight_per_actor=1),
        num_gpus=1 if where.gpu else None,
        num_cpus=None if where.gpu else where.cpus_per_actor,
        runtime_env={"env_vars": env} if env else None,
    )


def _run_round(
    ray: Any,
    config: Config,
    out: Path | ObjectPath,
    run_token: str,
    shards: list[int],
    where: Placement,
    outcome: RunOutcome,
    on_result: Callable[[ShardResult], None],
) -> None:
    max_attempts = config.run.max_shard_retries + 1
    seen: set[int] = set()
    for row in _pipeline(ray, config, out, run_token, shards, where).iter_rows():
        shard = int(row["shard"])
        seen.add(shard)
        tried = outcome.attempts.setdefault(shard, [])
        # the attempts this row's marker number skipped over never returned: their actor died
        # and Ray ran the shard again; a refused row means every allowed attempt was made
        made = max_attempts if row["refused"] else int(row["attempt"]) - 1
        tried.extend([DIED] * (made - len(tried)))
        if not row["refused"]:
            tried.append(str(row["worker"]))
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
