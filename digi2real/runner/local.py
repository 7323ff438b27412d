"""Local runners: in-process, or one worker process per device, pulling shards from the plan.

Every runner calls the same :class:`~digi2real.runner.shard.ShardRunner`. A shard that raises
(or whose worker dies) is retried a bounded number of times, on another worker when there is
one, then reported; the other shards go on.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.runner.plan import Plan
from digi2real.runner.shard import ShardResult

logger = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    results: list[ShardResult] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def build_shard_runner(config: Config, out: Path, source_root: Path, device: str) -> Any:
    from digi2real.runner.engine import Engine
    from digi2real.runner.shard import ShardRunner

    _set_threads(config.run.torch_threads)
    engine = Engine.from_config(config, device=device)
    return ShardRunner(engine, config, out, source_root)


def run_in_process(
    config: Config,
    out: Path,
    plan: Plan,
    shards: Iterable[int],
    *,
    device: str,
    on_result: Callable[[ShardResult], None] = lambda r: None,
) -> RunOutcome:
    runner = build_shard_runner(config, out, plan.source_root, device)
    outcome = RunOutcome()
    for shard in shards:
        for attempt in range(config.run.max_shard_retries + 1):
            try:
                result = runner.run(shard, plan.shards[shard])
            except Exception as error:  # noqa: BLE001 - a shard's failure must not end the run
                if isinstance(error, OSError) and getattr(error, "errno", None) in _FATAL_ERRNOS:
                    raise
                logger.warning("shard %d failed (attempt %d): %s", shard, attempt + 1, error)
                logger.debug("shard %d traceback", shard, exc_info=True)
                outcome.failed[shard] = f"{type(error).__name__}: {error}"
                continue
            outcome.failed.pop(shard, None)
            outcome.results.append(result)
            on_result(result)
            break
    return outcome


# disk full / read-only: every shard would fail the same way; stop with a clear error
_FATAL_ERRNOS = {28, 30, 122}


def _worker_main(
    worker_id: int,
    device: str,
    config_dict: dict[str, Any],
    out: str,
    plan: Plan,
    inbox: Any,
    outbox: Any,
) -> None:
    logging.basicConfig(level=logging.WARNING)
    config = Config.from_dict(config_dict)
    try:
        runner = build_shard_runner(config, Path(out), plan.source_root, device)
    except Exception as error:  # noqa: BLE001
        outbox.put(("dead", worker_id, None, f"worker start failed: {error}"))
        return
    outbox.put(("ready", worker_id, None, None))
    while True:
        shard = inbox.get()
        if shard is None:
            return
        try:
            result = runner.run(shard, plan.shards[shard])
        except Exception as error:  # noqa: BLE001
            fatal = isinstance(error, OSError) and getattr(error, "errno", None) in _FATAL_ERRNOS
            outbox.put(
                (
                    "fatal" if fatal else "error",
                    worker_id,
                    shard,
                    f"{type(error).__name__}: {error}\n{traceback.format_exc()}",
                )
            )
            continue
        outbox.put(("done", worker_id, shard, result))


def run_workers(
    config: Config,
    out: Path,
    plan: Plan,
    shards: Iterable[int],
    *,
    devices: list[str],
    on_result: Callable[[ShardResult], None] = lambda r: None,
) -> RunOutcome:
    """One worker process per entry of ``devices`` (e.g. ["cuda:0", "cuda:1"] or ["cpu"]*2)."""
    ctx = mp.get_context("spawn")
    outbox = ctx.Queue()
    todo = list(shards)
    attempts: dict[int, int] = {}
    avoid: dict[int, set[int]] = {}
    outcome = RunOutcome()
    workers: dict[int, tuple[Any, Any, str]] = {}
    busy: dict[int, int | None] = {}
    next_id = 0

    def spawn(device: str) -> None:
        nonlocal next_id
        inbox = ctx.Queue()
        proc = ctx.Process(
            target=_worker_main,
            args=(next_id, device, config.to_dict(), str(out), plan, inbox, outbox),
            daemon=True,
        )
        proc.start()
        workers[next_id] = (proc, inbox, device)
        busy[next_id] = "starting"  # type: ignore[assignment]
        next_id += 1

    for device in devices:
        spawn(device)
    respawns = 0
    fatal: str | None = None
    try:
        while (
            (todo or any(isinstance(v, int) for v in busy.values())) and workers and fatal is None
        ):
            for wid, state in list(busy.items()):
                if state is None and todo:
                    pick = next((s for s in todo if wid not in avoid.get(s, set())), todo[0])
                    todo.remove(pick)
                    busy[wid] = pick
                    workers[wid][1].put(pick)
            try:
                kind, wid, shard, payload = outbox.get(timeout=0.5)
            except queue.Empty:
                for wid, (proc, _inbox, device) in list(workers.items()):
                    if not proc.is_alive():
                        shard = busy.pop(wid)
                        del workers[wid]
                        logger.warning("worker %d (%s) died (exit %s)", wid, device, proc.exitcode)
                        if isinstance(shard, int):
                            _failed(
                                shard,
                                wid,
                                f"worker died (exit {proc.exitcode})",
                                attempts,
                                avoid,
                                todo,
                                outcome,
                                config,
                            )
                        if respawns < 2 * len(devices):
                            respawns += 1
                            spawn(device)
                continue
            if kind == "ready":
                busy[wid] = None
            elif kind == "done":
                busy[wid] = None
                outcome.failed.pop(shard, None)
                outcome.results.append(payload)
                on_result(payload)
            elif kind == "error":
                busy[wid] = None
                logger.warning(
                    "shard %d failed on worker %d: %s", shard, wid, payload.splitlines()[0]
                )
                _failed(shard, wid, payload, attempts, avoid, todo, outcome, config)
            elif kind == "fatal":
                fatal = payload
            elif kind == "dead":
                proc = workers.pop(wid)[0]
                busy.pop(wid, None)
                proc.join()
                logger.error("%s", payload)
                if not workers:
                    raise RuntimeError(payload)
    finally:
        for _proc, inbox, _ in workers.values():
            inbox.put(None)
        for proc, _, _ in workers.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if fatal is not None:
        raise OSError(fatal.splitlines()[0])
    for shard in todo:
        outcome.failed.setdefault(shard, "no worker left to run it")
    return outcome


def _failed(
    shard: int,
    worker: int,
    error: str,
    attempts: dict[int, int],
    avoid: dict[int, set[int]],
    todo: list[int],
    outcome: RunOutcome,
    config: Config,
) -> None:
    attempts[shard] = attempts.get(shard, 0) + 1
    avoid.setdefault(shard, set()).add(worker)
    outcome.failed[shard] = error.splitlines()[0]
    if attempts[shard] <= config.run.max_shard_retries:
        todo.append(shard)
