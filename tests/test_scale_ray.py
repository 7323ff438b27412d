"""The Ray runner on a local Ray instance and on a multi-node cluster (CPU, tiny profile): same
bytes as the in-process runner; per-shard failures are resubmitted and actors that die are
restarted, a bounded number of times; a worker node lost mid-run changes no output byte.

Every Ray test fails on a RayDeprecationWarning: the runner uses no deprecated Ray API and
silences no warning."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scale_helpers import (
    CONVERT_FIELDS,
    assert_consistent,
    assert_same_output,
    convert_argv,
    make_source,
    start_cli,
    stop_cli,
)

from digi2real.data import layout
from digi2real.data.layout import OutLayout
from digi2real.runner import faults
from digi2real.runner.convert import convert, derived_fields
from digi2real.runner.plan import prepare_out

logger = logging.getLogger(__name__)

RAY_DEPRECATIONS = "error::ray.util.annotations.RayDeprecationWarning"
# the same in a `digi2real` subprocess, where -W cannot name Ray's class (not imported yet):
# any DeprecationWarning raised at a call from the Ray runner's module is an error
RAY_DEPRECATIONS_ENV = {"PYTHONWARNINGS": "error::DeprecationWarning:digi2real.runner.ray"}

pytestmark = [pytest.mark.usefixtures("keep_torch_threads")]
if importlib.util.find_spec("ray") is not None:  # the filter imports its category's module
    pytestmark.append(pytest.mark.filterwarnings(RAY_DEPRECATIONS))


def test_without_ray_the_runner_says_how_to_install_it(
    tiny_weights, sample_dataset, tmp_path, monkeypatch, capsys
):
    from digi2real.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = make_source(tmp_path / "src", sample_dataset, 1)
    argv = convert_argv(src, tmp_path / "out", tiny_weights.root, "--runner", "ray")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "pip install 'digi2real[ray]'" in err


# -- a cluster of three nodes, as Ray tests itself (ray.cluster_utils) -------------------------
# First in this module: it runs before the module's local Ray instance starts.

_OBJECT_STORE = 80 * 1024 * 1024  # small: the pipeline moves only shard ids and result rows


@pytest.fixture
def ray_cluster():
    """A head without CPUs (the driver's node, as on many clusters: every actor lands on a
    worker node) and two worker nodes of two CPUs each: whichever worker node is lost, the
    other has room to restart its actors (the test runs two)."""
    yield from _cluster()


@pytest.fixture
def ray_cluster_on_s3(s3):
    """The same cluster, started once the store's variables are set: its nodes' processes
    (raylets, actors) find the store as a cloud node finds its own."""
    yield from _cluster()


def _cluster():
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": _OBJECT_STORE,
            "include_dashboard": False,
        },
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, object_store_memory=_OBJECT_STORE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _processes(node: Any) -> list[Any]:
    """Every process of a node: those it started (raylet...) and theirs (workers, actors)."""
    import psutil

    found = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                root = psutil.Process(info.process.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    return found


def _attempts(out: Path) -> list[tuple[float, int, int, int]]:
    """The run's attempt markers as (time, shard, attempt, actor pid)."""
    found = []
    for marker in (out / layout.STATE / layout.ATTEMPTS).glob("*/*"):
        shard, _, attempt = marker.name.partition(".")
        if not (shard.isdigit() and attempt.isdigit()):
            continue  # an actor's start, not a shard's attempt
        try:
            owner = marker.read_text()  # "host:pid (device)"
            when = marker.stat().st_mtime
        except OSError:
            continue  # removed at the end of the run
        if owner:  # else created but not written yet
            pid = int(owner.partition(" ")[0].rpartition(":")[2])
            found.append((when, int(shard), int(attempt), pid))
    return found


def test_ray_cluster_losing_a_worker_node_mid_run_gives_the_in_process_bytes(
    ray_cluster, scale_setup, scale_expected, tmp_path
):
    import psutil

    out = scale_setup["base"] / "ray-cluster"
    argv = convert_argv(
        scale_setup["src"],
        out,
        scale_setup["weights"],
        "--runner",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--device",
        "cpu",
        "--devices",
        "cpux2",  # two actors for three shards: the third starts once a shard has committed
    )
    log = tmp_path / "convert.log"
    process = start_cli(argv, log=log, env=RAY_DEPRECATIONS_ENV)
    seen: list[tuple[float, int, int, int]] = []
    try:
        # lose the node whose actor has just started the third shard: it is cut mid-shard
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            seen = _attempts(out)
            if len({shard for _, shard, _, _ in seen}) == 3:
                break  # the third shard has just started
            time.sleep(0.01)
        started = {shard for _, shard, _, _ in seen}
        assert len(started) == 3, f"the third shard never started: {seen}\n{log.read_text()}"
        _, shard, _, pid = max(seen)
        node = next(n for n in ray_cluster.worker_nodes if pid in {p.pid for p in _processes(n)})
        logger.info("losing a worker node mid-way through shard %d", shard)
        for proc in _processes(node):  # a node losing power: every process on it at once
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        ray_cluster.remove_node(node, allow_graceful=False)  # and Ray's own book-keeping
        # Ray restarts the actor on the other node and runs the shard again: a 2nd attempt
        while process.poll() is None and time.monotonic() < deadline:
            seen += _attempts(out)
            time.sleep(0.02)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop_cli(process)
    tail = f"convert's log (end):\n{log.read_text()[-6000:]}"
    assert process.returncode == 0, tail
    again = {(s, attempt) for _, s, attempt, _ in seen}
    assert (shard, 2) in again, f"shard {shard} not run again: {sorted(again)}\n{tail}"
    assert not (out / layout.STATE / layout.ATTEMPTS).exists()  # markers are not output
    assert_same_output(out, scale_expected)
    assert_consistent(out)


def test_ray_cluster_without_shared_storage_gives_the_in_process_bytes(
    ray_cluster_on_s3, s3, scale_setup, scale_expected, tmp_path
):
    """SRC, OUT and the weights on S3, nothing shared between the nodes but the store; the
    first actor to start dies while loading its models and is replaced: the in-process bytes."""
    base = s3.bucket("digi2real-ray")
    src = s3.upload(scale_setup["src"], f"{base}/src")
    weights = s3.upload(scale_setup["weights"], f"{base}/weights")
    out = f"{base}/out"
    argv = convert_argv(src, out, weights)  # type: ignore[arg-type]
    argv += ["--runner", "ray", "--ray-address", ray_cluster_on_s3.address, "--device", "cpu"]
    argv += ["--devices", "cpux2"]
    once = tmp_path / "died-loading"
    env = {
        **RAY_DEPRECATIONS_ENV,
        faults.ENV: "exit:worker-start",
        faults.ONCE_ENV: str(once),
        "DIGI2REAL_CACHE": str(tmp_path / "node-cache"),
    }
    log = tmp_path / "convert.log"
    process = start_cli(argv, log=log, env=env)
    try:
        process.wait(timeout=300)
    finally:
        stop_cli(process)
    assert process.returncode == 0, f"convert's log (end):\n{log.read_text()[-6000:]}"
    assert once.exists(), "no actor died while loading its models"
    assert s3.keys(f"{out}/.digi2real/attempts") == []  # markers are not output
    assert_same_output(out, scale_expected)


# -- a local Ray instance in this process --------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # "local": a new instance of this process's own, never the cluster another test (or an
    # xdist worker beside this one) started on this machine, which ray.init() would join
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _ray_config(setup, tiny_config, **overrides):
    settings = {**CONVERT_FIELDS, "run.runner": "ray", "run.devices": "cpux2", **overrides}
    return tiny_config(setup["src"], **settings)


def test_ray_run_matches_the_in_process_run(local_ray, scale_setup, scale_expected, tiny_config):
    out = scale_setup["base"] / "ray"
    convert(_ray_config(scale_setup, tiny_config), out, progress=False)
    assert_same_output(out, scale_expected)
    assert_consistent(out)


def test_ray_retries_failed_shards_and_dead_actors_a_bounded_number_of_times(
    local_ray, scale_setup, scale_expected, tiny_config, monkeypatch
):
    from digi2real.runner.ray import DIED, run_ray

    out = scale_setup["base"] / "ray-faults"
    # one actor: fewer actor start-ups (each imports torch) keep this test short
    config = _ray_config(
        scale_setup, tiny_config, **{"run.max_shard_retries": 1, "run.devices": "cpux1"}
    )
    plan = prepare_out(out, config, derived_fields(config), overwrite=False)
    paths = OutLayout(out)

    # an exception on every attempt: caught in the actor, resubmitted once, then reported
    monkeypatch.setenv(faults.ENV, "raise:shard-generated@1")
    outcome = run_ray(config, out, plan, [0, 1])
    assert list(outcome.failed) == [1] and "InjectedFault" in outcome.failed[1]
    assert len(outcome.attempts[1]) == 2 and DIED not in outcome.attempts[1]
    assert paths.is_committed(0) and not paths.is_committed(1)

    # an actor that dies half-way through writing shard 2's images, every time: Ray restarts
    # it and runs the shard again, until its two attempts are spent; then it is reported,
    # not run a third time, and the other shard commits
    monkeypatch.setenv(faults.ENV, "exit:shard-images-written@2")
    outcome = run_ray(config, out, plan, [1, 2])
    assert list(outcome.failed) == [2] and "gave up after 2 attempt(s)" in outcome.failed[2]
    assert outcome.attempts[2] == [DIED, DIED]
    assert paths.is_committed(1) and not paths.is_committed(2)
    assert not (paths.state / layout.ATTEMPTS).exists()

    # a new run counts afresh: shard 2 runs, commits and the run finalises (an actor dying
    # once and its restart committing the shard: the cluster test above)
    monkeypatch.delenv(faults.ENV)
    convert(config, out, progress=False)
    assert all(paths.is_committed(shard) for shard in range(3))
    assert_same_output(out, scale_expected)
    assert_consistent(out)
