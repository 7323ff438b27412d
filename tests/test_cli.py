"""The command line's contract: bad values exit 2 with the field named, failed runs exit 1,
Ctrl-C exits 130 with a resume line, and each command offers only its own options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from digi2real.cli import main
from digi2real.data.layout import OutLayout


def _convert_argv(tiny_weights, src: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", str(src), str(out), "--weights", str(tiny_weights.root), "-q", *extra]


@pytest.mark.parametrize(
    "section, field, value, expected",
    [
        ("generation", "guidance", "3", "generation.guidance = '3': must be a number"),
        ("generation", "channels_last", "no", "generation.channels_last = 'no': must be true"),
        ("output", "formats", "imagefolder", "output.formats = 'imagefolder': must be a list"),
        ("generation", "steps", -2, "generation.steps = -2: must be >= 1"),
        ("shift", "alpha", float("nan"), "shift.alpha = nan: must be a finite number"),
    ],
)
def test_bad_yaml_value_exits_2_naming_file_and_field(
    tiny_config, tiny_weights, sample_dataset, tmp_path, capsys, section, field, value, expected
):
    data = tiny_config().to_dict()
    data[section][field] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = _convert_argv(tiny_weights, sample_dataset, tmp_path / "out", "--config", str(path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--steps", "-1"], "--steps: generation.steps = -1: must be >= 1"),
        (["--formats", "imagefolder,tfrecord"], "--formats: output.formats = 'tfrecord'"),
        (["--shift-alpha", "nan"], "--shift-alpha: shift.alpha = nan: must be a finite number"),
        (["--preset", "paper"], "unknown preset 'paper'; valid: default"),
        (["--threads", "0"], "--threads: run.torch_threads = 0: must be >= 1"),
    ],
)
def test_bad_flag_exits_2_naming_the_flag(
    tiny_weights, sample_dataset, tmp_path, capsys, flags, expected
):
    assert main(_convert_argv(tiny_weights, sample_dataset, tmp_path / "out", *flags)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_bad_config_file_in_a_real_process_prints_one_line_no_traceback(
    tiny_config, tiny_weights, sample_dataset, tmp_path
):
    data = tiny_config().to_dict()
    data["generation"]["guidance"] = "3"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = _convert_argv(tiny_weights, sample_dataset, tmp_path / "out", "--config", str(path))
    result = subprocess.run(
        [sys.executable, "-m", "digi2real", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: generation.guidance = '3': must be a number"
    ]


def test_a_failed_run_exits_1(tiny_weights, sample_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIGI2REAL_FAULT", "raise:shard-start@0")
    argv = _convert_argv(tiny_weights, sample_dataset, tmp_path / "out", "--identities", "first:2")
    assert main(argv) == 1
    assert "failed after retries" in capsys.readouterr().err


def test_each_command_offers_only_its_options(capsys):
    generation = ("--steps", "--guidance", "--shift-alpha", "--batch-size", "--dtype")
    for command in (["embed"], ["report"], ["stats", "real"], ["weights", "verify"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert not [flag for flag in generation if flag in text], command
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in generation)
    # every positional argument says what it is
    assert "the source dataset" in text and "the output folder" in text


def test_ctrl_c_exits_130_with_a_resume_line_then_a_rerun_completes(
    tiny_weights, sample_dataset, tmp_path
):
    out = tmp_path / "out"
    argv = [
        *_convert_argv(tiny_weights, sample_dataset, out),
        "--outputs-per-identity",
        "6",
        "--steps",
        "10",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "digi2real", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    paths = OutLayout(out)
    deadline = time.monotonic() + 120
    while not paths.is_committed(0) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "shards committed" in stderr and "re-running the same command resumes" in stderr
    assert not paths.manifest.exists()
    assert main(argv) == 0
    assert paths.manifest.is_file()
    assert all(paths.is_committed(shard) for shard in range(3))


def test_verbosity_reaches_worker_processes(monkeypatch, capsys, tmp_path):
    import logging

    from digi2real.runner import faults

    monkeypatch.setenv(faults.LOG_LEVEL_ENV, "WARNING")  # restored (unset) after the test
    assert main(["-v", "weights", "verify", "--dir", str(tmp_path)]) == 1  # nothing there
    capsys.readouterr()
    # what every local worker and Ray actor receives from its driver, and applies
    env = faults.worker_environment()
    assert env[faults.LOG_LEVEL_ENV] == "INFO"
    root = logging.getLogger()
    before, handlers = root.level, list(root.handlers)
    try:
        root.handlers.clear()
        monkeypatch.setenv(faults.LOG_LEVEL_ENV, env[faults.LOG_LEVEL_ENV])
        faults.configure_worker_logging()
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = handlers
        root.setLevel(before)
