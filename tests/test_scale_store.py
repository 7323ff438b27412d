"""SRC and OUT on an object store (an S3 API on loopback: moto's server, the ``s3`` fixture),
and the same command on N nodes.

"Identical" is scale_helpers' comparison, object for object: an OUT on S3 holds exactly the
files of the in-process local run, byte for byte (config.yaml's environment and run.json's
placement and host paths aside, where the source root is a URL instead of a path).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from s3_helpers import ACCESS_KEY, SECRET_KEY, FaultProxy, client_env, closed_port
from scale_helpers import (
    assert_consistent,
    assert_same_output,
    convert_argv,
    killed_after,
    launch,
    run_forked,
    tree,
)

from digi2real.data.store import location
from digi2real.runner import faults

pytestmark = pytest.mark.usefixtures("keep_torch_threads")

RANDOM_SEED = 20261203
BUCKET = "digi2real-tests"


@pytest.fixture(scope="module")
def remote(s3, scale_setup, scale_expected) -> dict[str, Any]:
    """The scale tests' source uploaded once; each test writes its own OUT prefix."""
    base = s3.bucket(BUCKET)
    src = s3.upload(scale_setup["src"], f"{base}/src")
    return {"s3": s3, "base": base, "src": src, "weights": scale_setup["weights"]}


def _env(remote: dict[str, Any], tmp: Path, **extra: str) -> dict[str, str]:
    """What a forked run needs: the store's variables, a node cache of its own."""
    return {**remote["s3"].env, "DIGI2REAL_CACHE": str(tmp / "node-cache"), **extra}


def _argv(remote: dict[str, Any], out: str, *extra: str) -> list[str]:
    return convert_argv(remote["src"], out, remote["weights"], *extra)  # type: ignore[arg-type]


def test_conversion_on_s3_is_byte_identical_to_local(
    remote, scale_expected, tmp_path, monkeypatch, capsys
):
    """SRC on S3 -> OUT on S3, all three formats, in-process; then `report` and `evaluate
    train` read the OUT URL."""
    from digi2real.cli import main

    monkeypatch.setenv("DIGI2REAL_CACHE", str(tmp_path / "node-cache"))
    out = f"{remote['base']}/identical"
    assert main(_argv(remote, out)) == 0
    assert f"manifest:          {out}/manifest.parquet" in capsys.readouterr().out
    got = tree(out)
    assert any(name.startswith("wds/") for name in got) and "rec/train.rec" in got
    assert_same_output(out, scale_expected)

    # the report of the OUT URL is the report of the same dataset on disk
    local = tmp_path / "local-copy"
    shutil.copytree(scale_expected, local)
    assert main(["report", out, "--html"]) == 0
    assert main(["report", str(local), "--html"]) == 0
    for name in ("report.json", "index.html", "similarity_hist.png", "contact_000.png"):
        assert (
            location(f"{out}/report/{name}").read_bytes() == (local / "report" / name).read_bytes()
        )

    # training reads the WebDataset shards of the URL: the samples of the local ImageFolder
    from digi2real.evaluate.data import open_dataset

    shards = open_dataset(out, seed=3)
    folder = open_dataset(local, "imagefolder", seed=3)
    assert type(shards).__name__ == "WebDatasetFaces"
    assert (len(shards), shards.num_classes) == (len(folder), folder.num_classes)
    for index in range(len(folder)):
        image, label = shards[index]
        expected, expected_label = folder[index]
        assert label == expected_label and bool((image == expected).all())
    ckpt = tmp_path / "ckpt"
    args = ["evaluate", "train", out, "--out", str(ckpt), "--backbone", "small", "--epochs", "1"]
    assert main([*args, "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    assert (ckpt / "backbone.safetensors").is_file()


def test_killed_while_writing_to_s3_then_the_same_command_gives_the_same_output(
    remote, scale_expected, tmp_path
):
    """SIGKILL at a shard's and at finalisation's commit boundaries and at seeded random
    instants of a run writing to S3; the same command then finishes the identical output."""
    env = _env(remote, tmp_path)
    anchor = tmp_path / "node-cache" / "source"  # the run's first fetch from the store
    lines = []
    for spec in ("shard-images-written@1", "finalize-formats"):
        out = f"{remote['base']}/killed-{spec.replace('@', '-')}"
        log = tmp_path / f"{spec}.log"
        assert run_forked(_argv(remote, out), env={**env, faults.ENV: spec}, log=log) == -9
        assert not location(f"{out}/manifest.parquet").exists()
        # what a killed Ray driver leaves: gone once another runner finishes the output
        remote["s3"].fs.pipe_file(f"{out[5:]}/.digi2real/attempts/0123abcd/000001.1", b"h:1")
        assert run_forked(_argv(remote, out), env=env, log=log) == 0, log.read_text()[-3000:]
        assert_same_output(out, scale_expected)
    rng = random.Random(RANDOM_SEED)
    for index in range(2):
        out = f"{remote['base']}/killed-random-{index}"
        delay = rng.uniform(0.0, 2.0)
        log = tmp_path / f"random-{index}.log"
        shutil.rmtree(anchor.parent, ignore_errors=True)
        code = killed_after(_argv(remote, out), delay, anchor=anchor, log=log, env=env)
        lines.append(f"delay {delay:.2f}s: {'killed' if code is None else code}")
        assert run_forked(_argv(remote, out), env=env, log=log) == 0, (lines, log.read_text())
        assert_same_output(out, scale_expected)


# -- the same command on N nodes --------------------------------------------------------------


def _ranks(argv: list[str], env: dict[str, str], log: Path, faulty: dict[int, str]) -> list[int]:
    """Three ranks of one command started at once; their exit codes."""
    processes = []
    for rank in range(3):
        rank_env = {**env, **({faults.ENV: faulty[rank]} if rank in faulty else {})}
        rank_argv = [*argv, "--num-nodes", "3", "--node-rank", str(rank)]
        processes.append(launch(rank_argv, env=rank_env, log=log.with_suffix(f".{rank}.log")))
    for process in processes:
        process.join(timeout=300)
    return [process.exitcode for process in processes]


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_three_ranks_of_one_command_give_the_output_of_one_process(
    storage, remote, scale_setup, scale_expected, tmp_path
):
    """``--num-nodes 3 --node-rank 0/1/2`` at once into one OUT: the one-process output.
    Then again with rank 1 killed mid-shard: the other ranks finish their shards and leave the
    dataset unassembled; re-running rank 1 alone commits its shard and assembles it (on the
    local disk with another N: rank 1 of 2 takes what is left of 1 modulo 2)."""
    env = _env(remote, tmp_path)
    if storage == "local":
        argv = convert_argv(scale_setup["src"], tmp_path / "ranks", scale_setup["weights"])
        out: Any = tmp_path / "ranks"
        killed_argv = convert_argv(scale_setup["src"], tmp_path / "killed", scale_setup["weights"])
        killed_out: Any = tmp_path / "killed"
    else:
        out, killed_out = f"{remote['base']}/ranks", f"{remote['base']}/ranks-killed"
        argv, killed_argv = _argv(remote, out), _argv(remote, killed_out)
    log = tmp_path / "ranks.log"
    codes = _ranks(argv, env, log, {})
    assert codes == [0, 0, 0], [log.with_suffix(f".{r}.log").read_text()[-2000:] for r in range(3)]
    assert_same_output(out, scale_expected)
    if storage == "local":
        assert_consistent(out)

    codes = _ranks(killed_argv, env, log, {1: "shard-images-written@1"})
    assert codes == [0, -9, 0]
    assert not location(f"{killed_out}/manifest.parquet").exists()
    waiting = [log.with_suffix(f".{r}.log").read_text() for r in (0, 2)]
    assert all("not committed yet" in text for text in waiting), waiting
    nodes = "2" if storage == "local" else "3"
    rerun = [*killed_argv, "--num-nodes", nodes, "--node-rank", "1"]
    assert run_forked(rerun, env=env, log=log) == 0, log.read_text()[-3000:]
    assert_same_output(killed_out, scale_expected)


# -- faults of the store ----------------------------------------------------------------------


def test_a_flaky_store_loses_nothing(remote, scale_expected, tmp_path):
    """A proxy in front of the store fails a seeded share of requests with 503 SlowDown, 500
    InternalError or a dropped connection (before or after the server applied it): the run
    retries with backoff and finishes the identical output."""
    out = f"{remote['base']}/flaky"
    with FaultProxy(remote["s3"].endpoint, share=0.12, seed=RANDOM_SEED) as proxy:
        env = _env(remote, tmp_path, AWS_ENDPOINT_URL=proxy.endpoint)
        log = tmp_path / "flaky.log"
        code = run_forked(_argv(remote, out), env=env, log=log)
    assert code == 0, (proxy.faults, log.read_text()[-3000:])
    assert len(proxy.faults) >= 3, f"too few kinds of fault injected: {proxy.faults}"
    assert_same_output(out, scale_expected)


@pytest.mark.parametrize("problem", ["unreachable", "missing bucket", "denied", "expired"])
def test_an_unusable_store_stops_before_any_work_with_one_line(
    problem, remote, tmp_path, monkeypatch
):
    out = f"{remote['base']}/refused-{problem.replace(' ', '-')}"
    env = _env(remote, tmp_path)
    argv = _argv(remote, out)
    expected = {
        "unreachable": "store unreachable",
        "missing bucket": "bucket not found",
        "denied": "access denied or credentials expired",
        "expired": "access denied or credentials expired",
    }[problem]
    log = tmp_path / "refused.log"
    if problem == "unreachable":
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}", AWS_MAX_ATTEMPTS="2")
        code = run_forked(argv, env=env, log=log)
    elif problem == "missing bucket":
        argv = _argv(remote, "s3://digi2real-no-such-bucket/out")
        code = run_forked(argv, env=env, log=log)
    else:
        mode = "deny-writes" if problem == "denied" else "expired"
        with FaultProxy(remote["s3"].endpoint, mode=mode) as proxy:
            code = run_forked(argv, env={**env, "AWS_ENDPOINT_URL": proxy.endpoint}, log=log)
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, text[-3000:]
    assert len(errors) == 1 and expected in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert remote["s3"].keys(out) == []  # nothing was written


def test_no_credential_in_any_output_file_or_log_line(remote, tmp_path):
    """A conversion on S3 with -vv (botocore's debug logging included): no output object and
    no log line holds the secret key or the access key id."""
    out = f"{remote['base']}/secrets"
    log = tmp_path / "secrets.log"
    code = run_forked(["-vv", *_argv(remote, out)], env=_env(remote, tmp_path), log=log)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "botocore" in text, "debug logging did not reach the client's requests"
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in text
        holders = [name for name, data in tree(out).items() if secret.encode() in data]
        assert holders == []
        raw = [key for key in remote["s3"].keys(out) if secret.encode() in remote["s3"].fs.cat(key)]
        assert raw == []


def test_credentials_in_a_url_are_refused():
    from digi2real.data.store import StorageAccessError

    with pytest.raises(StorageAccessError, match="credentials do not belong in a URL"):
        location("s3://KEY:SECRET@bucket/out")
    assert client_env("http://127.0.0.1:1")["AWS_EC2_METADATA_DISABLED"] == "true"


def test_statistics_and_gallery_given_as_urls(remote, scale_setup, tmp_path, monkeypatch):
    """The domain shift's statistics files and the report's gallery read from the store give
    the bytes their local copies give."""
    import torch

    from digi2real.cli import main
    from digi2real.data.embeddings import save_embeddings
    from digi2real.data.manifest import read_npy
    from digi2real.pipeline.conditioning import IdentityEncoder
    from digi2real.pipeline.domain_shift import compute_stats, embedding_batches
    from digi2real.weights import open_weights

    monkeypatch.setenv("DIGI2REAL_CACHE", str(tmp_path / "node-cache"))
    encoder = IdentityEncoder.from_weights(open_weights(str(scale_setup["weights"])), id_dim=16)
    torch.set_num_threads(1)
    rng = torch.Generator().manual_seed(5)
    stats = {}
    for kind in ("real", "synthetic"):
        embeddings = torch.nn.functional.normalize(torch.randn(64, 16, generator=rng), dim=1)
        made = compute_stats(
            embedding_batches(embeddings.numpy(), 32),
            encoder.encode,
            kind=kind,
            encoder_digest=encoder.digest,
            source=kind,
        )
        stats[kind] = (made.save(tmp_path / f"{kind}.stats"), f"{remote['base']}/{kind}.stats")
        made.save(stats[kind][1])
    runs = {}
    for where, (src, out, index) in {
        "local": (scale_setup["src"], tmp_path / "shifted", 0),
        "s3": (remote["src"], f"{remote['base']}/shifted", 1),
    }.items():
        shift = ["--shift-method", "mean_shift", "--shift-alpha", "1.0"]
        shift += ["--real-stats", str(stats["real"][index])]
        shift += ["--synthetic-stats", str(stats["synthetic"][index])]
        assert main(convert_argv(src, out, scale_setup["weights"], *shift)) == 0  # type: ignore[arg-type]
        runs[where] = out
    assert tree(runs["s3"]) == tree(runs["local"])

    gallery = read_npy(runs["local"] / ".digi2real" / "outputs.npy")[:2]
    save_embeddings(tmp_path / "gallery.npy", gallery)
    save_embeddings(f"{remote['base']}/gallery.npy", gallery)
    assert main(["report", str(runs["local"]), "--gallery", str(tmp_path / "gallery.npy")]) == 0
    assert main(["report", runs["s3"], "--gallery", f"{remote['base']}/gallery.npy"]) == 0
    local_report = (runs["local"] / "report" / "report.json").read_bytes()
    assert location(f"{runs['s3']}/report/report.json").read_bytes() == local_report
    assert b"leak" in local_report
