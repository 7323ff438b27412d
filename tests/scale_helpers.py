"""Shared by the scale and fault tests: a tiny source, `convert` argv, reference runs, and
the comparison of two outputs (import as ``from scale_helpers import ...``); their fixtures
(``scale_setup``, ``scale_expected``, ``keep_torch_threads``) are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

FORMATS = "imagefolder,webdataset,recordio"
IDENTITIES = 3
# fields that may differ between runs of one output (config.FREE_FIELDS): how it was run
RUN_FIELDS = ("devices", "runner", "ray_address", "max_shard_retries", "num_nodes", "node_rank")
# and where: host paths (config.HOST_PATH_FIELDS), which also differ between a local run and
# one on an object store
TEMP_NAME = re.compile(r"^\..+\.tmp$")
REPO = Path(__file__).resolve().parents[1]

# the Config fields convert_argv sets: ``tiny_config(src, **CONVERT_FIELDS)`` is the Config it
# gives (same run.json, same output)
CONVERT_FIELDS: dict[str, Any] = {
    "generation.steps": 2,
    "interpolation.outputs_per_identity": 3,
    "output.shard_size": 1,
    "output.formats": FORMATS.split(","),
}

_references: dict[tuple[str, ...], Path] = {}


def make_source(root: Path, sample: Path, count: int = IDENTITIES) -> Path:
    """``count`` identities of the bundled sample under ``root``."""
    for name in sorted(p.name for p in sample.iterdir() if p.is_dir())[:count]:
        shutil.copytree(sample / name, root / name)
    return root


def convert_argv(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "convert",
        str(src),
        str(out),
        "--weights",
        str(weights),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--outputs-per-identity",
        "3",
        "--shard-size",
        "1",
        "--formats",
        FORMATS,
        "-q",
        *extra,
    ]


def reference(src: Path, weights: Path, base: Path, *extra: str) -> Path:
    """An uninterrupted in-process run, once per test session for each argv."""
    from digi2real.cli import main

    key = (str(src), str(weights), *extra)
    if key not in _references:
        out = base / f"reference-{len(_references)}"
        assert main(convert_argv(src, out, weights, *extra)) == 0
        _references[key] = out
    return _references[key]


def cli(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``digi2real ARGV`` in a new process group (its worker processes die with it)."""
    return subprocess.run(
        [sys.executable, "-m", "digi2real.cli", *argv],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        start_new_session=True,
    )


# Imported once by the fork server, so that each forked `digi2real` run starts in well under
# a second instead of re-importing torch/diffusers (~5 s): dozens of kill/resume runs fit the
# test budget this way. The runs are still separate processes that SIGKILL themselves.
_PRELOAD = [
    "digi2real.cli",
    "digi2real.env",
    "digi2real.runner.convert",
    "digi2real.runner.engine",
    "digi2real.runner.finalize",
    "digi2real.data.writers.recordio",
    "digi2real.data.writers.webdataset",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "transformers.models.clip.modeling_clip",
    "onnxruntime",
    "cv2",
    "scale_helpers",
]


def _forked_cli(argv: list[str], env: dict[str, str], log: str) -> None:
    os.setsid()  # its own process group, as a shell would start it
    for key in [key for key in os.environ if key.startswith("DIGI2REAL_FAULT")]:
        del os.environ[key]  # the fork server's environment is not the test's
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from digi2real.cli import main

    sys.stdout.flush()
    os._exit(main(argv))


def forkserver() -> Any:
    """The multiprocessing context whose fork server has the heavy modules imported."""
    import multiprocessing as mp
    from multiprocessing import forkserver as server

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    server.ensure_running()  # now, before a test sets fault variables the server would keep
    return ctx


def launch(argv: list[str], *, env: dict[str, str] | None = None, log: Path) -> Any:
    """``digi2real ARGV`` in a process forked from a pre-warmed fork server."""
    process = forkserver().Process(target=_forked_cli, args=(argv, env or {}, str(log)))
    process.start()
    return process


def run_forked(argv: list[str], *, env: dict[str, str] | None = None, log: Path) -> int:
    """``digi2real ARGV`` to its end (see :func:`launch`); the exit code (-9: SIGKILLed)."""
    process = launch(argv, env=env, log=log)
    process.join(timeout=300)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"digi2real {' '.join(argv)} did not finish; log in {log}")
    return process.exitcode


def _wait_for(anchor: Path, process: Any) -> None:
    deadline = time.monotonic() + 120
    while not anchor.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


def work_window(argv: list[str], *, anchor: Path, log: Path) -> float:
    """Seconds from ``anchor`` (a path the run creates) appearing to the end of a clean
    ``digi2real ARGV`` run (:func:`launch`)."""
    process = launch(argv, log=log)
    _wait_for(anchor, process)
    start = time.monotonic()
    process.join(timeout=300)
    if process.exitcode != 0:
        raise RuntimeError(f"clean run failed ({process.exitcode}); log in {log}")
    return time.monotonic() - start


def killed_after(
    argv: list[str],
    delay: float,
    *,
    anchor: Path,
    log: Path,
    env: dict[str, str] | None = None,
) -> int | None:
    """Start ``digi2real ARGV`` (:func:`launch`) and SIGKILL its process group ``delay``
    seconds after ``anchor`` appears; the exit code, or None when it was killed."""
    process = launch(argv, env=env, log=log)
    try:
        _wait_for(anchor, process)
        process.join(timeout=delay)
        if process.exitcode is not None:
            return process.exitcode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.join()
        return None
    finally:
        if process.is_alive():
            process.kill()
            process.join()


def _normal_config(record: dict) -> dict:
    record.pop("environment", None)  # how/where it ran (placement) lives there too
    return record


def tree(out: Any) -> dict[str, bytes]:
    """Every file under ``out`` (a folder, or a URL / ObjectPath of a store's prefix: object
    for object) as bytes (run state included, its temporary files not), with what may differ
    between runs of one output taken out: config.yaml's environment (which holds the
    placement: devices, runner, batch size... and the host paths) and in the run state's
    run.json the placement and the host paths."""
    from digi2real.config import HOST_PATH_FIELDS
    from digi2real.data.store import files_under, location

    files = {}
    for rel, path in sorted(files_under(location(out))):
        if rel.startswith(".digi2real/") and TEMP_NAME.match(path.name):
            continue  # a killed write's leftover in the run state: never read, allowed
        data = path.read_bytes()
        if rel == "config.yaml":
            data = yaml.safe_dump(_normal_config(yaml.safe_load(data))).encode()
        elif rel == ".digi2real/run.json":
            record = json.loads(data)
            for key in [f"run.{key}" for key in RUN_FIELDS] + list(HOST_PATH_FIELDS):
                record["config"].pop(key, None)
            data = json.dumps(record, sort_keys=True).encode()
        files[rel] = data
    return files


def assert_same_output(out: Any, expected: Path) -> None:
    got, want = tree(out), tree(expected)
    assert sorted(got) == sorted(want), (
        f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    )
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"files differ from the uninterrupted run: {different}"


def temp_files(out: Path) -> list[str]:
    """Temporary (half-written) files under ``out`` outside the run state."""
    return [
        path.relative_to(out).as_posix()
        for path in out.rglob("*")
        if TEMP_NAME.match(path.name) and ".digi2real" not in path.relative_to(out).parts
    ]


def assert_consistent(out: Path) -> None:
    """Manifest rows = image files, no duplicate, labels contiguous, no temp file."""
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "duplicate manifest rows"
    files = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert files == set(paths)
    assert sorted({row["label"] for row in rows}) == list(range(len({r["identity"] for r in rows})))
    assert temp_files(out) == []


def start_cli(
    argv: list[str], *, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``digi2real ARGV`` started as :func:`cli` runs it, its output going to ``log``; the
    caller waits for it (and kills its process group if the test fails first)."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "digi2real.cli", *argv],
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )


def stop_cli(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a :func:`start_cli` run's process group if it still runs."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
