"""Kill -9 at every commit boundary and at seeded random instants, then resume; a full or
read-only disk. After a resume the output must be exactly the uninterrupted run's."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import pytest
from scale_helpers import (
    assert_consistent,
    assert_same_output,
    convert_argv,
    killed_after,
    run_forked,
    temp_files,
    tree,
    work_window,
)

from digi2real.data import fsio
from digi2real.runner import faults

SHARD_POINTS = [p for p in faults.POINTS if p.startswith("shard-")]
FINAL_POINTS = [p for p in faults.POINTS if p.startswith("finalize-")]
KILLED_SHARD = 1  # the middle one of three: one shard before it committed, one after it not
RANDOM_SEED = 20240607
RANDOM_KILLS = 5
SLOW_RANDOM_KILLS = 20

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def _argv(setup: dict[str, Path], out: Path) -> list[str]:
    return convert_argv(setup["src"], out, setup["weights"])


def _kill_then_resume(setup: dict[str, Path], spec: str) -> dict[str, Any]:
    name = f"kill-{spec.replace('@', '-')}"
    out, log = setup["base"] / name, setup["base"] / f"{name}.log"
    killed = run_forked(_argv(setup, out), env={faults.ENV: spec}, log=log)
    state = {
        "committed": _committed(out),
        "finished": (out / "manifest.parquet").exists(),
        "temps": temp_files(out),
    }
    if spec.startswith("finalize-"):
        # what a kill in the middle of a write leaves (the random kills hit these by chance)
        for folder, name in (("", "labels.csv"), ("rec", "train.rec"), ("images/0", "0000.jpg")):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f".{name}.4242.0123456789ab.tmp").write_bytes(b"half")
    resumed = run_forked(_argv(setup, out), log=log.with_suffix(".resume.log"))
    return {"out": out, "killed": killed, "state": state, "resumed": resumed, "log": log}


def _committed(out: Path) -> list[str]:
    return sorted(p.parent.name for p in out.glob(".digi2real/shards/*/manifest.parquet"))


def _log(run: dict[str, Any], suffix: str = ".log") -> str:
    return run["log"].with_suffix(suffix).read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def boundary_runs(scale_setup, scale_expected) -> dict[str, dict[str, Any]]:
    """Every commit boundary killed in its own OUT, then resumed."""
    specs = [f"{p}@{KILLED_SHARD}" for p in SHARD_POINTS] + FINAL_POINTS
    return {spec: _kill_then_resume(scale_setup, spec) for spec in specs}


@pytest.mark.parametrize("point", SHARD_POINTS + FINAL_POINTS)
def test_kill_at_commit_boundary_then_resume(boundary_runs, scale_expected, point):
    spec = f"{point}@{KILLED_SHARD}" if point.startswith("shard-") else point
    run = boundary_runs[spec]
    assert run["killed"] == -9, _log(run)
    assert not run["state"]["finished"], "a killed run must not look finished"
    committed = run["state"]["committed"]
    if point.startswith("shard-"):
        # shards run in order: the ones before the killed one are committed, later ones not
        expect = [f"{s:06d}" for s in range(KILLED_SHARD + (point == "shard-committed"))]
        assert committed == expect
    else:
        assert committed == ["000000", "000001", "000002"]
    assert run["resumed"] == 0, _log(run, ".resume.log")
    assert_same_output(run["out"], scale_expected)
    assert_consistent(run["out"])


def _random_kills(setup: dict[str, Path], expected: Path, count: int, seed: int) -> list[str]:
    """``count`` runs SIGKILLed at seeded random instants of their work, each then resumed;
    returns a line per run (kept in the failure message)."""
    # the window: from the run state appearing to the end of a clean run
    probe = setup["base"] / f"probe-{seed}"
    window = work_window(_argv(setup, probe), anchor=probe, log=probe.with_suffix(".log"))
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        out = setup["base"] / f"random-{seed}-{index}"
        delay = rng.uniform(0.0, window)
        log = out.with_suffix(".log")
        code = killed_after(_argv(setup, out), delay, anchor=out, log=log)
        state = f"{len(_committed(out))} shards committed, {len(temp_files(out))} temp files"
        lines.append(f"delay {delay:.2f}s: {'killed' if code is None else code}, {state}")
        resumed = run_forked(_argv(setup, out), log=out.with_suffix(".resume.log"))
        assert resumed == 0, (lines, out.with_suffix(".resume.log").read_text()[-3000:])
        assert_same_output(out, expected)
        assert_consistent(out)
    return lines


def test_kill_at_seeded_random_instants_then_resume(scale_setup, scale_expected):
    lines = _random_kills(scale_setup, scale_expected, RANDOM_KILLS, RANDOM_SEED)
    assert sum("killed" in line for line in lines) >= 1, lines


@pytest.mark.slow
def test_kill_at_twenty_random_instants_then_resume(scale_setup, scale_expected):
    lines = _random_kills(scale_setup, scale_expected, SLOW_RANDOM_KILLS, RANDOM_SEED + 1)
    assert sum("killed" in line for line in lines) >= SLOW_RANDOM_KILLS // 2, lines


@pytest.mark.slow
def test_killed_again_and_again_in_one_output(scale_setup, scale_expected):
    """One OUT killed at ten random instants in a row, each resume killed again."""
    out = scale_setup["base"] / "again-and-again"
    rng = random.Random(RANDOM_SEED + 2)
    log = out.with_suffix(".log")
    for _ in range(10):
        killed_after(_argv(scale_setup, out), rng.uniform(0.0, 1.5), anchor=out, log=log)
    assert run_forked(_argv(scale_setup, out), log=log) == 0
    assert_same_output(out, scale_expected)
    assert_consistent(out)


# -- full and read-only disks -----------------------------------------------------------------


def _inject(monkeypatch: pytest.MonkeyPatch, code: int, hit: Any) -> list[str]:
    """Make fsio's low-level write fail with ``code`` for files whose path satisfies ``hit``;
    returns the paths it failed."""
    opened: dict[int, str] = {}
    failed: list[str] = []
    open_exclusive, write_all = fsio._open_exclusive, fsio._write_all

    def tracking_open(path: Path) -> int:
        fd = open_exclusive(path)
        opened[fd] = str(path)
        return fd

    def failing_write(fileobj, data) -> None:
        path = opened.get(fileobj.fileno(), "")
        if hit(path):
            failed.append(path)
            raise OSError(code, "injected")
        write_all(fileobj, data)

    monkeypatch.setattr(fsio, "_open_exclusive", tracking_open)
    monkeypatch.setattr(fsio, "_write_all", failing_write)
    return failed


@pytest.mark.parametrize(
    ("code", "message", "where"),
    [
        (errno.ENOSPC, "disk full while writing", "shard"),
        (errno.EROFS, "output is read-only", "finalize"),
    ],
)
def test_disk_full_or_read_only_is_a_clear_error_then_a_rerun_completes(
    scale_setup, scale_expected, tmp_path, monkeypatch, capsys, code, message, where
):
    from digi2real.cli import main

    out = tmp_path / "out"
    if where == "shard":  # the images of the second shard's identity
        failed = _inject(monkeypatch, code, lambda p: f"/images/{KILLED_SHARD}/" in p)
    else:  # finalisation, after every shard committed
        failed = _inject(monkeypatch, code, lambda p: Path(p).name.startswith(".labels.csv"))
    assert main(_argv(scale_setup, out)) == 1  # a run that failed (not a usage error)
    err = capsys.readouterr().err
    assert failed, "the injected failure was never reached"
    assert f"error: {message}" in err
    final_name = Path(failed[0]).name.split(".")[1]
    assert final_name in err and ".tmp" not in err, "the error must name the file, not its temp"
    committed = sorted(p.parent.name for p in out.glob(".digi2real/shards/*/manifest.parquet"))
    assert committed == (["000000"] if where == "shard" else ["000000", "000001", "000002"])
    assert not (out / "manifest.parquet").exists()
    assert temp_files(out) == []
    # what was committed is intact: byte-identical to the uninterrupted run's
    got, want = tree(out), tree(scale_expected)
    for name in got:
        if name.startswith(".digi2real/shards/") or name.startswith("images/0/"):
            assert got[name] == want[name], name
    monkeypatch.undo()
    assert main(_argv(scale_setup, out)) == 0
    assert_same_output(out, scale_expected)
    assert_consistent(out)


def test_unknown_fault_kind_is_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "explode:shard-start")
    with pytest.raises(ValueError, match="valid: kill, exit, raise"):
        faults.point("shard-start", 0)
