"""The Ray runner on a local Ray instance (CPU, tiny profile): same bytes as the in-process
runner; per-shard failures and dead actors are resubmitted a bounded number of times."""

from __future__ import annotations

import sys

import pytest
from scale_helpers import (
    CONVERT_FIELDS,
    assert_consistent,
    assert_same_output,
    convert_argv,
    make_source,
)

from digi2real.data.layout import OutLayout
from digi2real.runner import faults
from digi2real.runner.convert import convert, derived_fields
from digi2real.runner.plan import prepare_out

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


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


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def test_ray_resubmits_failed_shards_a_bounded_number_of_times(
    local_ray, scale_setup, scale_expected, tiny_config, monkeypatch
):
    from digi2real.runner.ray import run_ray

    out = scale_setup["base"] / "ray-faults"
    # one actor: fewer actor start-ups (each imports torch) keep this test short
    config = _ray_config(
        scale_setup, tiny_config, **{"run.max_shard_retries": 1, "run.devices": "cpux1"}
    )
    plan = prepare_out(out, config, derived_fields(config), overwrite=False)

    # an exception on every attempt: caught in the actor, resubmitted once, then reported
    monkeypatch.setenv(faults.ENV, "raise:shard-generated@1")
    outcome = run_ray(config, out, plan, [0, 1])
    assert list(outcome.failed) == [1] and "InjectedFault" in outcome.failed[1]
    assert len(outcome.attempts[1]) == 2
    assert OutLayout(out).is_committed(0) and not OutLayout(out).is_committed(1)

    # an actor that dies half-way through writing a shard's images: the shard comes back
    # with no result, is resubmitted to a fresh actor and commits
    monkeypatch.setenv(faults.ENV, "exit:shard-images-written@2")
    monkeypatch.setenv(faults.ONCE_ENV, str(scale_setup["base"] / "ray-exit.fired"))
    outcome = run_ray(config, out, plan, [1, 2])
    assert outcome.failed == {}
    assert outcome.attempts[2][0] == "lost" and len(outcome.attempts[2]) == 2
    assert all(OutLayout(out).is_committed(shard) for shard in range(3))

    monkeypatch.delenv(faults.ENV)
    convert(config, out, progress=False)  # finalises only: every shard is committed
    assert_same_output(out, scale_expected)
    assert_consistent(out)
