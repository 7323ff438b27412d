"""Local runners: in-process, or one worker process per device, pulling shards from the plan.

Every runner calls the same :meth:`~digi2real.runner.shard.ShardRunner.run`, so the committed
shards do not depend on the runner. A shard that raises, or whose worker dies, is retried up to
``run.max_shard_retries`` times, on another worker when there is one, then reported in
:attr:`RunOutcome.failed`; the other shards go on. A full or read-only output
(:func:`is_fatal`) stops the run at once: every later shard would fail the same way.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.data.store import ObjectPath
from digi2real.device import set_threads, torch_threads
from digi2real.runner import faults
from digi2real.runner.outcome import RunOutcome, fatal_error, is_fatal
from digi2real.runner.plan import Plan
from digi2real.runner.shard import ShardResult, ShardRunner

logger = logging.getLogger(__name__)

# how often a worker checks that its driver is still alive
_POLL_SECONDS = 0.5
EXIT_ORPHANED = 3  # a worker whose driver died


def run_in_process(
    config: Config,
    out: Path | ObjectPath,
    plan: Plan,
    shards: Iterable[int],
    *,
    device: str,
    on_result: Callable[[ShardResult], None] = lambda r: None,
    engine: Any = None,
    shift: Any = None,
) -> RunOutcome:
    """``engine``: an already loaded Engine to use (the Python API's), else one is built
    (with ``shift``, the domain shift the driver has loaded)."""
    runner = ShardRunner.build(config, out, plan.source_root, device, engine=engine, shift=shift)
    outcome = RunOutcome()
    with torch_threads(config.run.torch_threads):
        _run_shards(runner, config, plan, shards, outcome, on_result)
    return outcome


def _run_shards(
    runner: ShardRunner,
    config: Config,
    plan: Plan,
    shards: Iterable[int],
    outcome: RunOutcome,
    on_result: Callable[[ShardResult], None],
) -> None:
    for shard in shards:
        for attempt in range(config.run.max_shard_retries + 1):
            outcome.attempts.setdefault(shard, []).append("in-process")
            try:
                result = runner.run(shard, plan.shards[shard])
            except Exception as error:  # noqa: BLE001 - a shard's failure must not end the run
                if is_fatal(error):
                    raise
                logger.warning("shard %d failed (attempt %d): %s", shard, attempt + 1, error)
                logger.debug("shard %d traceback", shard, exc_info=True)
                outcome.failed[shard] = f"{type(error).__name__}: {error}"
                continue
            outcome.failed.pop(shard, None)
            outcome.results.append(result)
            on_result(result)
            break


# -- one process per device --------------------------------------------------------------------


def _worker_main(
    worker_id: int,
    device: str,
    config_dict: dict[str, Any],
    out: str,
    source_root: str,
    env: dict[str, str],
    inbox: Any,
    outbox: Any,
) -> None:
    # Ctrl-C reaches the whole process group: the driver alone decides (it stops the workers;
    # committed shards stay, a re-run resumes), so a worker prints no traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_driver()
    # a forkserver child inherits the server's environment, not the driver's
    faults.adopt_environment(env)
    faults.configure_worker_logging()
    config = Config.from_dict(config_dict)
    try:
        set_threads(config.run.torch_threads)
        faults.point("worker-start")
        runner = ShardRunner.build(config, out, source_root, device)
    except Exception as error:  # noqa: BLE001 - reported to the driver, which decides
        outbox.put(("dead", worker_id, None, f"worker start failed: {error}"))
        return
    outbox.put(("ready", worker_id, None, None))
    parent = mp.parent_process()
    while True:
        try:
            task = inbox.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            # a driver killed with SIGKILL cannot tell its workers; they must not linger
            if parent is not None and not parent.is_alive():
                return
            continue
        if task is None:
            return
        shard, identities = task
        try:
            result = runner.run(shard, identities)
        except Exception as error:  # noqa: BLE001
            if is_fatal(error):
                outbox.put(("fatal", worker_id, shard, (error.errno, str(error))))
                continue
            message = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            outbox.put(("error", worker_id, shard, message))
            continue
        outbox.put(("done", worker_id, shard, result))


def _exit_with_driver() -> None:
    """A watchdog thread that ends this worker within ``_POLL_SECONDS`` of its driver's death,
    whatever the worker is doing (loading models, in a shard's C code): a driver killed with
    SIGKILL cannot tell its workers, and they must not linger."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_alive():
            time.sleep(_POLL_SECONDS)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="driver-watchdog", daemon=True).start()


@dataclass
class _Worker:
    process: Any
    inbox: Any
    device: str
    name: str
    shard: int | None = None  # the shard it is running
    ready: bool = False


class _Scheduler:
    """The driver's book-keeping: which shard runs where, attempts, and failures."""

    def __init__(self, shards: Iterable[int], config: Config, outcome: RunOutcome) -> None:
        self.todo = list(shards)
        self.retries = config.run.max_shard_retries
        self.outcome = outcome
        self.failed_on: dict[int, list[str]] = {}  # shard -> workers it failed on, in order

    def pick(self, worker: _Worker, live: list[_Worker]) -> int | None:
        """A shard for ``worker``: one that has not failed on it; else one that has failed on
        every live worker, but not last on this one (unless it is the only one left)."""
        for shard in self.todo:
            if worker.name not in self.failed_on.get(shard, ()):
                return shard
        for shard in self.todo:
            tried = self.failed_on.get(shard, [])
            everywhere = all(other.name in tried for other in live)
            if everywhere and (tried[-1] != worker.name or len(live) == 1):
                return shard
        return None

    def start(self, worker: _Worker, shard: int) -> None:
        self.todo.remove(shard)
        worker.shard = shard
        self.outcome.attempts.setdefault(shard, []).append(worker.name)

    def done(self, worker: _Worker, result: ShardResult) -> None:
        worker.shard = None
        self.outcome.failed.pop(result.shard, None)
        self.outcome.results.append(result)

    def fail(self, worker: _Worker, shard: int, error: str) -> None:
        worker.shard = None
        self.failed_on.setdefault(shard, []).append(worker.name)
        self.outcome.failed[shard] = error.splitlines()[0]
        tries = len(self.outcome.attempts.get(shard, []))
        if tries <= self.retries:
            logger.warning("shard %d failed on %s, retrying: %s", shard, worker.name, error)
            self.todo.append(shard)
        else:
            logger.error("shard %d failed %d times, giving up: %s", shard, tries, error)


def run_workers(
    config: Config,
    out: Path | ObjectPath,
    plan: Plan,
    shards: Iterable[int],
    *,
    devices: list[str],
    on_result: Callable[[ShardResult], None] = lambda r: None,
    start_method: str = "spawn",
) -> RunOutcome:
    """One worker process per entry of ``devices`` (e.g. ``["cuda:0", "cuda:1"]`` or
    ``["cpu"] * 2``), each with its own model copy, pulling shards from the plan.

    ``start_method`` is multiprocessing's: ``spawn`` (default: CUDA cannot be used in a
    child forked from a process that touched it) or ``forkserver``."""
    if not devices:
        raise ValueError("run_workers needs at least one device")
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"unknown start_method {start_method!r}; valid: spawn, forkserver")
    ctx = mp.get_context(start_method)
    outbox = ctx.Queue()
    outcome = RunOutcome()
    scheduler = _Scheduler(shards, config, outcome)
    workers: dict[int, _Worker] = {}
    config_dict = config.to_dict()
    env = faults.worker_environment()
    next_id = 0
    start_failures = 0

    def spawn(device: str) -> None:
        nonlocal next_id
        inbox = ctx.Queue()
        process = ctx.Process(
            target=_worker_main,
            args=(
                next_id,
                device,
                config_dict,
                str(out),
                str(plan.source_root),
                env,
                inbox,
                outbox,
            ),
            daemon=True,
        )
        process.start()
        workers[next_id] = _Worker(process, inbox, device, f"worker-{next_id} ({device})")
        next_id += 1

    def lose(worker_id: int, why: str) -> None:
        """A worker is gone: charge its shard, start a replacement while that is bounded."""
        nonlocal start_failures
        worker = workers.pop(worker_id)
        worker.process.join(timeout=5)
        if worker.shard is not None:
            scheduler.fail(worker, worker.shard, f"{worker.name} died ({why})")
        elif not worker.ready:
            start_failures += 1
        # a death while running a shard is charged to that shard, whose attempts are bounded;
        # deaths while starting are bounded separately
        if scheduler.todo and start_failures < len(devices):
            spawn(worker.device)

    for device in devices:
        spawn(device)
    fatal: tuple[int, str] | None = None
    try:
        while workers and fatal is None:
            busy = [w for w in workers.values() if w.shard is not None]
            if not scheduler.todo and not busy:
                break
            live = list(workers.values())
            for worker in [w for w in live if w.ready and w.shard is None]:
                shard = scheduler.pick(worker, live)
                if shard is not None:
                    scheduler.start(worker, shard)
                    worker.inbox.put((shard, plan.shards[shard]))
            try:
                kind, worker_id, shard, payload = outbox.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                for worker_id, worker in list(workers.items()):
                    if not worker.process.is_alive():
                        logger.warning(
                            "%s died (exit code %s)", worker.name, worker.process.exitcode
                        )
                        lose(worker_id, f"exit code {worker.process.exitcode}")
                continue
            worker = workers.get(worker_id)
            if worker is None:  # a message from a worker already given up on
                continue
            if kind == "ready":
                worker.ready = True
            elif kind == "done":
                scheduler.done(worker, payload)
                on_result(payload)
            elif kind == "error":
                scheduler.fail(worker, shard, payload)
            elif kind == "fatal":
                fatal = payload
            elif kind == "dead":
                logger.error("%s: %s", worker.name, payload)
                lose(worker_id, payload)
                if not workers:
                    raise RuntimeError(payload)
    except BaseException:
        # Ctrl-C or a driver error: the shards in flight are abandoned (their commits are
        # atomic; a re-run redoes them), so the workers are stopped at once
        _stop(workers.values(), wait=0)
        raise
    finally:
        _stop(workers.values())
    if fatal is not None:
        raise fatal_error(*fatal)
    for shard in scheduler.todo:
        outcome.failed.setdefault(shard, "no worker left to run it")
    return outcome


def _stop(workers: Iterable[_Worker], wait: float = 30) -> None:
    """Ask each worker to finish (a worker mid-shard finishes it first, up to ``wait``
    seconds; its commit is atomic either way), then kill what is left."""
    workers = [worker for worker in workers if worker.process.is_alive()]
    for worker in workers:
        try:
            worker.inbox.put(None)
        except (OSError, ValueError):
            continue
    for worker in workers:
        worker.process.join(timeout=wait)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
