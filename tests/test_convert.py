"""The conversion end to end on the tiny profile (issue: the conversion)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from digi2real.config import Config
from digi2real.data.images import read_image_note
from digi2real.runner.convert import convert
from digi2real.runner.plan import ConfigMismatchError
from digi2real.weights.configs import TINY_ID_DIM

OUTPUTS = 3
STEPS = 3


@pytest.fixture(scope="module")
def source(tmp_path_factory, sample_dataset) -> tuple[Path, dict[str, str]]:
    """4 identities from the bundled sample plus planted bad files; returns (root, planted)."""
    root = tmp_path_factory.mktemp("src") / "digiface"
    for name in ("0", "1", "2"):
        shutil.copytree(sample_dataset / name, root / name)
    planted = {}
    (root / "0" / "9.png").write_bytes(b"")
    planted["0/9.png"] = "empty file"
    (root / "1" / "8.png").write_text("this is not an image")
    planted["1/8.png"] = "not an image"
    data = (sample_dataset / "2" / "0.png").read_bytes()
    (root / "2" / "7.png").write_bytes(data[: len(data) // 2])
    planted["2/7.png"] = "truncated"
    # an identity whose only image is unusable: skipped for too few usable images
    (root / "bad id").mkdir()
    (root / "bad id" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    planted["bad id/0.png"] = ""
    # a greyscale render: converted, not rejected
    grey = Image.open(sample_dataset / "1" / "0.png").convert("L")
    grey.save(root / "1" / "5.png")
    return root, planted


@pytest.fixture(scope="module")
def make_config(tiny_config, source):
    """``make_config(**overrides)``: this module's Config, on ``source`` with OUTPUTS outputs
    an identity, STEPS steps and two identities a shard."""

    def make(**overrides) -> Config:
        settings = {
            "interpolation.outputs_per_identity": OUTPUTS,
            "generation.steps": STEPS,
            "output.shard_size": 2,
        }
        return tiny_config(source[0], **{**settings, **overrides})

    return make


def tree(out: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(out))
            data = path.read_bytes()
            if rel == "config.yaml":
                record = yaml.safe_load(data)
                record.pop("environment")
                data = yaml.safe_dump(record).encode()
            files[rel] = data
    return files


@pytest.fixture(scope="module")
def reference(make_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = convert(make_config(), out, progress=False)
    return out, summary


def test_counts_rows_files_and_errors(reference, source):
    out, summary = reference
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    usable_identities = 3
    assert len(manifest) + len(rejected) == usable_identities * OUTPUTS
    assert summary.images == len(manifest)
    files = {str(p.relative_to(out)) for p in (out / "images").rglob("*.jpg")}
    assert files == {row["path"] for row in manifest}
    for row in manifest:
        assert row["path"] == f"images/{row['identity']}/{row['index']:04d}.jpg"
    by_path = {row["path"]: row for row in errors}
    for path, reason in source[1].items():
        assert path in by_path, f"planted bad file {path} not in errors.parquet"
        assert reason in by_path[path]["reason"]
    assert any(r["identity"] == "bad id" and "too few usable images" in r["reason"] for r in errors)


def test_manifest_columns_labels_and_metadata(reference, tiny_weights):
    out, _ = reference
    table = pq.read_table(out / "manifest.parquet")
    for column in [
        "key",
        "identity",
        "label",
        "path",
        "attempt",
        "seed",
        "interp_kind",
        "source_paths",
        "interp_weights",
        "sampler",
        "steps",
        "guidance",
        "dtype",
        "shift_method",
        "shift_alpha",
        "similarity",
        "shard",
        "weights_digest",
        "version",
    ]:
        assert column in table.column_names, column
    rows = table.to_pylist()
    labels = [line.split(",") for line in (out / "labels.csv").read_text().splitlines()[1:]]
    assert [name for _, name in labels] == sorted({r["identity"] for r in rows})
    assert [int(i) for i, _ in labels] == list(range(len(labels)))
    for row in rows:
        assert row["key"] == f"{row['label']:07d}_{row['index']:04d}"
        assert row["weights_digest"] == tiny_weights.digest and row["steps"] == STEPS
        assert row["source_paths"] and all(
            p.startswith(f"{row['identity']}/") for p in row["source_paths"]
        )
        assert abs(sum(row["interp_weights"]) - 1) < 1e-6
    outputs = np.load(out / ".digi2real" / "outputs.npy")
    targets = np.load(out / ".digi2real" / "targets.npy")
    assert outputs.shape == targets.shape == (len(rows), TINY_ID_DIM)
    sims = (outputs * targets).sum(1)
    assert np.allclose(sims, [r["similarity"] for r in rows], atol=1e-5)
    jpeg = (out / rows[0]["path"]).read_bytes()
    note = read_image_note(jpeg)
    assert note and "synthetic" in note.lower() and "digi2real" in note
    with Image.open(out / rows[0]["path"]) as image:
        assert image.size == (112, 112)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["environment"]["packages"]["torch"]
    assert config["weights"]["digest"] == tiny_weights.digest
    assert (out / "DATASET_CARD.md").is_file()


def test_second_run_does_no_generation_work(reference, make_config, monkeypatch):
    out, _ = reference
    before = tree(out)

    def no_engine(*args, **kwargs):
        raise AssertionError("a re-run of a finished conversion must not build models")

    monkeypatch.setattr("digi2real.runner.engine.Engine.from_config", no_engine)
    convert(make_config(), out, progress=False)
    assert tree(out) == before


def test_same_config_twice_is_byte_identical(reference, make_config, tmp_path):
    out = tmp_path / "again"
    convert(make_config(), out, progress=False)
    assert tree(out) == tree(reference[0])


def test_batch_size_changes_no_noise(make_config, tmp_path):
    """Batch size is a performance knob: same targets, seeds and (up to float rounding of
    batched kernels) pixels. The generated images are compared before the lossy JPEG
    encoding (<= 2 levels, the bar); a JPEG can turn a 1-level input change into a few
    levels, so the files are held to a mean bound."""
    from digi2real.runner.engine import Engine

    outs, crops = {}, {}
    for batch in (1, 4):
        outs[batch] = tmp_path / f"bs{batch}"
        cfg = make_config(**{"generation.batch_size": batch})
        captured = []
        original = Engine.postprocess

        def spy(self, images, _captured=captured, _original=original):
            faces = _original(self, images)
            _captured.extend(f.crop for f in faces)
            return faces

        Engine.postprocess = spy
        try:
            convert(cfg, outs[batch], progress=False)
        finally:
            Engine.postprocess = original
        crops[batch] = captured
    rows = {b: pq.read_table(o / "manifest.parquet").to_pylist() for b, o in outs.items()}
    assert [(r["key"], r["seed"]) for r in rows[1]] == [(r["key"], r["seed"]) for r in rows[4]]
    assert len(crops[1]) == len(crops[4]) == len(rows[1])
    worst = max(
        int(np.abs(a.astype(int) - b).max()) for a, b in zip(crops[1], crops[4], strict=True)
    )
    assert worst <= 2
    for row in rows[1]:
        a = np.asarray(Image.open(outs[1] / row["path"]), dtype=int)
        b = np.asarray(Image.open(outs[4] / row["path"]), dtype=int)
        assert np.abs(a - b).mean() < 0.5


def test_changed_config_is_refused_naming_the_field(reference, make_config):
    with pytest.raises(ConfigMismatchError, match="generation.steps"):
        convert(
            make_config(**{"generation.steps": STEPS + 1}),
            reference[0],
            progress=False,
        )


def test_kill_mid_run_then_resume_gives_the_same_output(reference, make_config, source, tmp_path):
    out = tmp_path / "killed"
    cfg = make_config()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [
        sys.executable,
        "-m",
        "digi2real.cli",
        "convert",
        str(source[0]),
        str(out),
        "--config",
        str(cfg_path),
        "-q",
    ]
    env = {**os.environ, "DIGI2REAL_FAULT": "shard-images-written@1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (out / ".digi2real" / "shards" / "000000" / "manifest.parquet").is_file()
    assert not (out / ".digi2real" / "shards" / "000001" / "manifest.parquet").exists()
    assert not (out / "manifest.parquet").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference[0])


def test_overwrite_starts_over(make_config, tmp_path):
    out = tmp_path / "o"
    convert(
        make_config(**{"source.identities": "first:1"}),
        out,
        progress=False,
    )
    summary = convert(
        make_config(**{"source.identities": "first:2"}),
        out,
        overwrite=True,
        progress=False,
    )
    assert summary.identities == 2


def test_not_a_digi2real_output_is_refused(make_config, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write .*precious.txt"):
        convert(make_config(), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_dry_run_plans_without_generating(tiny_weights, source, tmp_path, capsys):
    from digi2real.cli import main

    out = tmp_path / "dry"
    code = main(
        [
            "convert",
            str(source[0]),
            str(out),
            "--weights",
            str(tiny_weights.root),
            "--preset",
            "tiny",
            "--dry-run",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "identities" in text and "estimated_gpu_hours" in text and "out_writable" in text
    assert not out.exists()


def test_keep_original_writes_full_resolution_beside_each_crop(make_config, tmp_path):
    out = tmp_path / "orig"
    cfg = make_config(**{"source.identities": "first:1", "output.keep_original": True})
    convert(cfg, out, progress=False)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    originals = sorted(
        p.relative_to(out / "originals").as_posix() for p in (out / "originals").rglob("*.jpg")
    )
    assert originals == sorted(r["path"].removeprefix("images/") for r in rows)
    with Image.open(out / "originals" / originals[0]) as image:
        assert image.size == (64, 64)  # the tiny profile's resolution (512 with real weights)


def test_config_yaml_config_is_portable_and_round_trips(
    reference, make_config, tiny_weights, source
):
    from digi2real.config import merge_environment

    out, _ = reference
    record = yaml.safe_load((out / "config.yaml").read_text())
    text = yaml.safe_dump(record["config"])
    assert str(source[0]) not in text and str(tiny_weights.root) not in text
    assert "batch_size" not in text and "devices" not in text
    assert record["environment"]["paths"]["source.root"] == str(source[0])
    assert record["environment"]["placement"]["generation.batch_size"] == 8
    rebuilt = Config.from_dict(merge_environment(record))
    assert rebuilt == make_config()
    card = (out / "DATASET_CARD.md").read_text()
    assert str(source[0]) not in card and str(tiny_weights.root) not in card
