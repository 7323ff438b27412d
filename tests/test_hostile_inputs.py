"""Careless and hostile command lines (issue 23): each is refused with exit 2 and one line that
says what is wrong, before OUT is touched; SRC and everything outside OUT stay as they were.

The cases: sources that make no sense (empty, one identity's folder, a selection of nothing,
images that are all bad), counts past the machine or a documented cap (workers, threads,
outputs, attempts, batch, shard size), a `mix` whose sum overflows, YAML bombs and undecodable
configs, a mistyped --weights, statistics that do not load, and a relative SRC (recorded
absolute, so the report finds it from anywhere)."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
import yaml
from helpers import fingerprint, tiny_convert

from digi2real.cli import main
from digi2real.config import Config
from digi2real.data import layout
from digi2real.device import available_cpus

EXIT_USAGE = 2


@pytest.fixture(autouse=True)
def _quiet_model_loading():
    """What a fresh ``digi2real`` process gets from HF_HUB_DISABLE_PROGRESS_BARS (set before
    transformers is imported): in this long-lived test process transformers may have been
    imported earlier, with its loading bars on."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dataset) -> Path:
    """A working folder holding SRC (two identities) and nothing else."""
    root = tmp_path_factory.mktemp("hostile")
    for name in ("0", "1"):
        shutil.copytree(sample_dataset / name, root / "src" / name)
    return root


@pytest.fixture(scope="module")
def argv(tiny_weights):
    return partial(tiny_convert, tiny_weights.root)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, world, argv) -> Path:
    """A finished conversion of SRC, copied by the tests that run against one."""
    out = tmp_path_factory.mktemp("hostile_done") / "out"
    assert main(argv(world / "src", out)) == 0
    return out


def refused(argv: list[str], capsys) -> str:
    """Run ``argv``: exit 2, one line on stderr, no traceback; that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- sources that make sense (case 5) ----------------------------------------------------------


def test_empty_source_is_refused(world, argv, tmp_path, capsys):
    (empty := tmp_path / "empty").mkdir()
    line = refused(argv(empty, tmp_path / "out"), capsys)
    assert f"nothing to convert: {empty} is empty" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout_flag", [(), ("--layout", "folders")])
def test_one_identity_folder_as_source_names_the_mistake(
    world, argv, tmp_path, capsys, layout_flag
):
    before = fingerprint(world)
    line = refused(argv(world / "src" / "0", tmp_path / "out", *layout_flag), capsys)
    assert "looks like one identity's folder" in line
    assert "one folder per identity" in line
    assert not (tmp_path / "out").exists()
    assert fingerprint(world) == before


def test_identity_selection_of_nothing_is_refused(world, argv, tmp_path, capsys):
    line = refused(argv(world / "src", tmp_path / "out", "--identities", "100:200"), capsys)
    assert "--identities 100:200 selects none of the 2 identities" in line
    assert not (tmp_path / "out").exists()


def test_source_of_bad_images_only_is_exit_2_naming_the_error_table(argv, tmp_path, capsys):
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "0.jpg").write_bytes(b"not a jpeg")
        (src / name / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    line = refused(argv(src, out), capsys)
    assert "no source image could be used (6 error(s): 2 x not an image" in line
    assert str(out / layout.ERRORS) in line
    assert (out / layout.ERRORS).is_file()  # the run's record of why stays for the user


# -- bounded resources (cases 6, 7) ------------------------------------------------------------

CPUS = available_cpus()

BOUNDS = [
    (("--devices", f"cpux{CPUS * 500}"), f"--devices cpux{CPUS * 500}: CPU workers are cpuxN"),
    (("--devices", "cpuxlots"), "--devices cpuxlots: CPU workers are cpuxN with N from 1"),
    (("--devices", "0,0"), "--devices 0,0: a GPU is named twice"),
    (("--threads", str(10**20)), "--threads: run.torch_threads = 100000000000000000000: must be"),
    (("--threads", str(CPUS + 1)), f"--threads {CPUS + 1}: this machine has {CPUS} CPU(s)"),
    (("--outputs-per-identity", str(10**12)), "--outputs-per-identity: interpolation.outputs"),
    (("--max-attempts", str(10**20)), "--max-attempts: filter.max_attempts = "),
    (("--batch-size", str(10**9)), "--batch-size: generation.batch_size = 1000000000: must be <="),
    (("--shard-size", str(10**9)), "--shard-size: output.shard_size = 1000000000: must be <="),
]


@pytest.mark.parametrize(("extra", "expected"), BOUNDS, ids=[" ".join(b[0]) for b in BOUNDS])
def test_counts_past_the_machine_or_a_cap_are_refused_before_out_is_touched(
    world, argv, tmp_path, capsys, extra, expected
):
    out = tmp_path / "out"
    line = refused(argv(world / "src", out, *extra), capsys)
    assert expected in line
    assert not out.exists()


def test_mix_whose_sum_overflows_is_refused(world, argv, tmp_path, capsys):
    record = Config.preset_named("tiny").to_dict()
    record["interpolation"]["mix"] = {"source": 1.0e308, "slerp": 1.0e308}
    (config := tmp_path / "mix.yaml").write_text(yaml.safe_dump(record))
    line = refused(argv(world / "src", tmp_path / "out", "--config", str(config)), capsys)
    assert "interpolation.mix" in line and "sum must be a finite number" in line


def test_mix_is_normalised_at_load_and_a_normalised_mix_is_kept_as_written():
    from digi2real.config import InterpolationConfig

    huge = InterpolationConfig(mix={"source": 1.0e307, "slerp": 3.0e307}).mix
    assert huge == {"source": 0.25, "slerp": 0.75}
    config = Config.preset_named("tiny")
    config.interpolation.mix = {"slerp": 2.0, "dirichlet": 2.0}  # a Python override too
    assert config.interpolation.mix == {"slerp": 0.5, "dirichlet": 0.5}
    assert Config.preset_named("default").interpolation.mix == {
        "source": 0.2,
        "slerp": 0.5,
        "dirichlet": 0.3,
    }


# -- configs (case 8, 10) ----------------------------------------------------------------------


def test_what_digi2real_writes_as_yaml_it_reads_back_without_aliases(tmp_path):
    from digi2real.config import dump_yaml, read_yaml

    shared = [127.5, 127.5, 127.5]
    record = {"mean": shared, "std": shared, "name": "ünï"}
    (path := tmp_path / "config.yaml").write_text(dump_yaml(record), encoding="utf-8")
    assert "&" not in path.read_text(encoding="utf-8")  # yaml.safe_dump writes &id001 here
    assert read_yaml(path) == record


def test_yaml_alias_bomb_is_one_short_line(world, argv, tmp_path, capsys):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    lines.append("generation: {steps: *a8}")
    (bomb := tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    line = refused(argv(world / "src", tmp_path / "out", "--config", str(bomb)), capsys)
    assert line.startswith(f"error: {bomb}: not valid YAML: aliases (*a0) are not read")
    assert len(line) < 300


def test_huge_config_value_is_shown_cut(world, argv, tmp_path, capsys):
    (config := tmp_path / "big.yaml").write_text(
        yaml.safe_dump({"generation": {"steps": ["x" * 1000] * 1000}})
    )
    line = refused(argv(world / "src", tmp_path / "out", "--config", str(config)), capsys)
    assert "generation.steps" in line and len(line) < 400


def test_config_that_is_not_utf8_is_named(world, argv, tmp_path, capsys):
    (config := tmp_path / "latin1.yaml").write_bytes("run:\n  seed: 'é'\n".encode("latin-1"))
    line = refused(argv(world / "src", tmp_path / "out", "--config", str(config)), capsys)
    assert line.startswith(f"error: {config}: not UTF-8 text")


def test_mistyped_weights_dir_is_named_first(world, tmp_path, capsys):
    missing = tmp_path / "weigths"
    # the default preset wants statistics: the missing weights must be what is reported
    line = refused(
        ["convert", str(world / "src"), str(tmp_path / "out"), "--weights", str(missing)], capsys
    )
    assert f"no weights at {missing}" in line


# -- a refused run changes nothing (case 11) ---------------------------------------------------


def _corrupt_stats(tmp_path: Path) -> tuple[str, ...]:
    for name in ("real.stats", "synth.stats"):
        (tmp_path / name).write_bytes(b"\x00" * 7)
    return (
        "--shift-method",
        "mean_shift",
        "--shift-alpha",
        "0.5",
        "--real-stats",
        str(tmp_path / "real.stats"),
        "--synthetic-stats",
        str(tmp_path / "synth.stats"),
    )


REFUSALS = {
    "threads": lambda tmp: ("--threads", str(CPUS + 1)),
    "workers": lambda tmp: ("--devices", f"cpux{CPUS + 1}"),
    "stats": _corrupt_stats,
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refused_run_leaves_out_as_it_was(finished, world, argv, tmp_path, capsys, refusal):
    extra = REFUSALS[refusal](tmp_path)
    # a new OUT is not created, an empty one stays empty
    refused(argv(world / "src", tmp_path / "new", *extra), capsys)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    refused(argv(world / "src", tmp_path / "empty", *extra), capsys)
    assert fingerprint(tmp_path / "empty") == {}
    # a finished OUT is neither reopened nor cleared, with or without --overwrite
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = fingerprint(out)
    for flags in ((), ("--overwrite",)):
        refused(argv(world / "src", out, *extra, *flags), capsys)
        assert fingerprint(out) == before
    # and the corrected command is not refused as "a different config"
    assert main(argv(world / "src", tmp_path / "new")) == 0


# -- paths (case 13) ---------------------------------------------------------------------------


def test_relative_source_is_recorded_absolute(world, argv, monkeypatch, tmp_path):
    monkeypatch.chdir(world)
    out = tmp_path / "out"
    assert main(argv("src", out)) == 0
    record = yaml.safe_load((out / layout.CONFIG).read_text(encoding="utf-8"))
    roots = [v for k, v in _leaves(record) if k.endswith("source.root")]
    assert roots == [str(world / "src")]


def _leaves(record: dict, prefix: str = "") -> list[tuple[str, object]]:
    found = []
    for key, value in record.items():
        if isinstance(value, dict):
            found += _leaves(value, f"{prefix}{key}.")
        else:
            found.append((f"{prefix}{key}", value))
    return found
