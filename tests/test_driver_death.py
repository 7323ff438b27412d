"""Workers die with their driver: a driver SIGKILLed while its two local workers load their
models, or while they run a shard, leaves no worker process alive 10 seconds later."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from scale_helpers import convert_argv, start_cli, stop_cli

GRACE_SECONDS = 10.0


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("stall", ["worker-start", "shard-embedded"])
def test_no_worker_outlives_a_killed_driver(scale_setup, tmp_path, stall):
    argv = convert_argv(
        scale_setup["src"], tmp_path / "out", scale_setup["weights"], "--devices", "cpux2"
    )
    stalled = tmp_path / "stalled"  # created by the first worker that reaches the stall
    process = start_cli(
        argv,
        log=tmp_path / "log.txt",
        env={"DIGI2REAL_FAULT": f"stall:{stall}", "DIGI2REAL_FAULT_ONCE": str(stalled)},
    )
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        # the forkserver and two workers under the driver, one stalled where the fault says
        while time.monotonic() < deadline and not stalled.exists():
            time.sleep(0.2)
            assert process.poll() is None, (tmp_path / "log.txt").read_text()
        assert stalled.exists(), f"no worker stalled: {(tmp_path / 'log.txt').read_text()}"
        workers = _descendants(process.pid)
        assert len(workers) >= 3, workers
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(GRACE_SECONDS)
        alive = sorted(pid for pid in workers if _alive(pid))
        assert alive == [], f"still alive {GRACE_SECONDS} s after the driver's SIGKILL: {alive}"
    finally:
        stop_cli(process)
        for pid in _descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
