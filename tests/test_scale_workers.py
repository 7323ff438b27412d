"""One worker process per device: same bytes as one worker, in every format; a shard that
raises or kills its worker is retried elsewhere, then reported; training formats read back."""

from __future__ import annotations

import csv
import errno
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scale_helpers import (
    CONVERT_FIELDS,
    assert_consistent,
    assert_same_output,
    cli,
    convert_argv,
    forkserver,
)

from digi2real.data.fsio import OutputWriteError
from digi2real.data.layout import OutLayout
from digi2real.runner import faults
from digi2real.runner.convert import convert, derived_fields
from digi2real.runner.local import run_workers
from digi2real.runner.plan import prepare_out

TWO_CPUS = ["cpu", "cpu"]
pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def _run_workers(*args, **kwargs):
    # the production default (spawn) is what the CLI test runs; the retry tests start their
    # workers (and replacements) from the pre-warmed fork server: seconds instead of tens
    forkserver()
    return run_workers(*args, start_method="forkserver", **kwargs)


def test_two_workers_give_the_bytes_of_one_shard_by_shard(scale_setup, scale_expected):
    out = scale_setup["base"] / "two-workers"
    run = cli(convert_argv(scale_setup["src"], out, scale_setup["weights"], "--devices", "cpux2"))
    assert run.returncode == 0, run.stderr[-3000:]
    for shard in range(3):
        part = f".digi2real/shards/{shard:06d}"
        for name in sorted(p.name for p in (scale_expected / part).iterdir()):
            got = (out / part / name).read_bytes()
            want = (scale_expected / part / name).read_bytes()
            assert got == want, f"shard {shard}: {name}"
        tar = f"wds/shard-{shard:06d}.tar"
        assert (out / tar).read_bytes() == (scale_expected / tar).read_bytes(), tar
    assert_same_output(out, scale_expected)  # and every other file, rec/ and the manifest included
    assert_consistent(out)


def test_training_formats_read_back(scale_expected):
    import webdataset as wds

    from digi2real.data.writers.recordio import RecordIODataset

    manifest = pq.read_table(scale_expected / "manifest.parquet").to_pylist()
    with open(scale_expected / "labels.csv", encoding="utf-8", newline="") as handle:
        labels = {int(row["label"]): row["identity"] for row in csv.DictReader(handle)}
    assert sorted(labels) == list(range(len(labels)))  # contiguous
    assert sorted(labels.values()) == [labels[i] for i in range(len(labels))]  # sorted names
    assert {row["identity"] for row in manifest} == set(labels.values())
    for row in manifest:
        assert labels[row["label"]] == row["identity"]
    by_key = {row["key"]: row for row in manifest}

    tars = sorted(str(p) for p in (scale_expected / "wds").glob("shard-*.tar"))
    assert len(tars) == 3
    seen = []
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        row = by_key[sample["__key__"]]
        assert sample["jpg"] == (scale_expected / row["path"]).read_bytes()
        assert int(sample["cls"]) == row["label"]
        assert json.loads(sample["json"])["identity"] == row["identity"]
        seen.append(sample["__key__"])
    assert sorted(seen) == sorted(by_key)

    dataset = RecordIODataset(scale_expected / "rec")
    ordered = sorted(manifest, key=lambda r: (r["label"], r["index"]))
    assert len(dataset) == len(ordered) and dataset.num_classes == len(labels)
    for index, row in enumerate(ordered):
        image, label = dataset[index]
        assert label == row["label"]
        with Image.open(io.BytesIO((scale_expected / row["path"]).read_bytes())) as jpeg:
            assert np.array_equal(image, np.asarray(jpeg.convert("RGB")))


def _prepared(setup, tiny_config, name: str):
    out = setup["base"] / name
    config = tiny_config(setup["src"], **CONVERT_FIELDS)
    plan = prepare_out(out, config, derived_fields(config), overwrite=False)
    return out, config, plan


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_a_shard_failing_every_time_is_retried_on_other_workers_then_reported(
    scale_setup, scale_expected, tiny_config, monkeypatch, kind
):
    out, config, plan = _prepared(scale_setup, tiny_config, f"always-{kind}")
    monkeypatch.setenv(faults.ENV, f"{kind}:shard-generated@1")
    outcome = _run_workers(config, out, plan, range(3), devices=TWO_CPUS)
    assert list(outcome.failed) == [1]
    assert ("InjectedFault" if kind == "raise" else "died") in outcome.failed[1]
    tries = outcome.attempts[1]
    assert len(tries) == config.run.max_shard_retries + 1  # bounded
    assert all(a != b for a, b in zip(tries, tries[1:], strict=False)), tries
    assert [OutLayout(out).is_committed(s) for s in range(3)] == [
        True,
        False,
        True,
    ]  # others went on
    monkeypatch.delenv(faults.ENV)
    convert(config, out, progress=False)  # a re-run redoes only the failed shard
    assert_same_output(out, scale_expected)


def test_a_worker_dying_once_mid_shard_is_replaced_and_the_shard_redone(
    scale_setup, scale_expected, tiny_config, monkeypatch
):
    out, config, plan = _prepared(scale_setup, tiny_config, "dies-once")
    monkeypatch.setenv(faults.ENV, "exit:shard-images-written@0")  # half its images written
    monkeypatch.setenv(faults.ONCE_ENV, str(scale_setup["base"] / "dies-once.fired"))
    outcome = _run_workers(config, out, plan, range(3), devices=TWO_CPUS)
    assert outcome.failed == {}
    assert len(outcome.attempts[0]) == 2 and len(set(outcome.attempts[0])) == 2
    assert sorted(r.shard for r in outcome.results) == [0, 1, 2]
    monkeypatch.delenv(faults.ENV)
    convert(config, out, progress=False)
    assert_same_output(out, scale_expected)
    assert_consistent(out)


def test_disk_full_in_a_worker_stops_the_run_with_the_errno(scale_setup, tiny_config, monkeypatch):
    out, config, plan = _prepared(scale_setup, tiny_config, "worker-enospc")
    monkeypatch.setenv(faults.ENV, "enospc:shard-generated@1")
    with pytest.raises(OutputWriteError) as caught:
        _run_workers(config, out, plan, range(3), devices=["cpu"])
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value)
    assert OutLayout(out).is_committed(0) and not OutLayout(out).is_committed(1)
