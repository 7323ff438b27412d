"""Corrupt, truncated, tampered or hostile side files (#23, items 9 and 12): shift statistics,
``OUT/config.yaml``, training checkpoints, ONNX models, a weights dir's ``manifest.json`` and
``.npy`` galleries. Each is exit 2 with one line on stderr naming the file, no traceback; a
pickle that would run code is refused as such, and runs nothing."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from digi2real.cli import main
from digi2real.pipeline.domain_shift import ConditioningStats
from digi2real.pipeline.domain_shift.stats import FORMAT_NAME, _safetensors_bytes

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], named: Path) -> str:
    """Run the CLI; assert exit 2 and one line on stderr naming ``named``; return the line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert str(named) in lines[0], lines[0]
    return lines[0]


# -- shift statistics -----------------------------------------------------------------------


def _stats(kind: str) -> ConditioningStats:
    stats = ConditioningStats((3, 2), kind=kind, encoder_digest="a" * 64, source="t", max_samples=4)
    return stats.update(np.random.default_rng(0).normal(size=(10, 3, 2)))


def _stats_file(metadata: dict[str, str], **tensors: np.ndarray) -> bytes:
    good = _stats("synthetic")
    arrays = {"count": np.array(10.0), "mean": good.mean, "m2": good.m2, **tensors}
    return _safetensors_bytes(arrays, metadata)


def _header(header: object) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


def _meta(**fields: object) -> dict[str, str]:
    meta = {**_stats("synthetic").meta, **fields}
    return {"format": FORMAT_NAME, "format_version": "1", "meta": json.dumps(meta)}


STATS_CASES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda good: good[:-20],
    "random bytes": lambda good: os.urandom(256),
    "header a list": lambda good: _header([1, 2]),
    "__metadata__ a list": lambda good: _header({"__metadata__": [1]}),
    "meta a list": lambda good: _stats_file(
        {"format": FORMAT_NAME, "format_version": "1", "meta": "[1, 2]"}
    ),
    "kind a number": lambda good: _stats_file(_meta(kind=5)),
    "max_samples text": lambda good: _stats_file(_meta(max_samples="many")),
    "parts a number": lambda good: _stats_file(_meta(parts=5)),
    "a part without source": lambda good: _stats_file(_meta(parts=[{"count": 3}])),
    "offsets past the end": lambda good: _header(
        {
            "__metadata__": _meta(),
            "count": {"dtype": "F64", "shape": [], "data_offsets": [0, 800]},
        }
    ),
    "count infinite": lambda good: _stats_file(_meta(), count=np.array(np.inf)),
}


@pytest.fixture(scope="module")
def stats_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("stats")
    real = _stats("real").save(folder / "real.stats")
    return real, _stats("synthetic").to_bytes()


@pytest.mark.parametrize("case", STATS_CASES)
def test_a_bad_stats_file_is_one_line(case, stats_pair, tmp_path, capsys) -> None:
    real, good = stats_pair
    bad = tmp_path / "synthetic.stats"
    bad.write_bytes(STATS_CASES[case](good))
    refused(capsys, ["stats", "compare", str(real), str(bad)], bad)


def test_verbose_shows_the_traceback(stats_pair, tmp_path) -> None:
    real, good = stats_pair
    bad = tmp_path / "synthetic.stats"
    bad.write_bytes(good[:-20])
    with pytest.raises(ValueError, match="synthetic.stats"):
        main(["-v", "stats", "compare", str(real), str(bad)])


# -- a converted OUT: its config.yaml, galleries, a resumed training -------------------------


@pytest.fixture(scope="module")
def converted(tiny_config, tmp_path_factory) -> Path:
    from digi2real.runner.convert import convert

    out = tmp_path_factory.mktemp("hostile") / "out"
    config = tiny_config(**{"source.identities": "first:2", "generation.steps": 2})
    convert(config, out, progress=False)
    return out


def _record(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))


def _with(record: dict, *path: str, value: object) -> str:
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return yaml.safe_dump(record)


CONFIG_CASES: dict[str, Callable[[dict], str]] = {
    "invalid YAML": lambda record: "config: [\n  source: {\n",
    "a list": lambda record: "- config\n- environment\n",
    "empty": lambda record: "",
    "a python tag": lambda record: "!!python/object/apply:os.system ['echo pwned']\n",
    "a section of the wrong type": lambda record: _with(record, "environment", value=[1]),
    "a field of the wrong type": lambda record: _with(
        record, "config", "generation", "steps", value="many"
    ),
    "an unknown field": lambda record: _with(record, "config", "source", "colour", value=1),
    "an unknown section": lambda record: _with(record, "surprise", value={}),
    "an unknown environment path": lambda record: _with(
        record, "environment", "paths", "source.root.x", value="y"
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_tampered_config_yaml_is_one_line(case, converted, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    config = out / "config.yaml"
    config.write_text(CONFIG_CASES[case](_record(converted)), encoding="utf-8")
    refused(capsys, ["report", str(out)], config)
    assert not (out / "report").exists()  # refused before anything is written


def _gallery(rows: np.ndarray) -> np.ndarray:
    from digi2real.weights.configs import TINY_ID_DIM

    return np.resize(rows, (6, TINY_ID_DIM)).astype(np.float32)


def _unit(n: int) -> np.ndarray:
    from helpers import unit_rows

    from digi2real.weights.configs import TINY_ID_DIM

    return unit_rows(n, TINY_ID_DIM, seed=1)


def _with_row(row: int, value: float) -> np.ndarray:
    rows = _unit(6)
    rows[row] = value
    return rows


GALLERY_CASES: dict[str, Callable[[Path], None]] = {
    "a pickled object array": lambda path: np.save(
        path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True
    ),
    "random bytes": lambda path: path.write_bytes(os.urandom(300)),
    "truncated": lambda path: path.write_bytes(_npy_bytes(_unit(6))[:100]),
    "empty": lambda path: path.write_bytes(b""),
    "one dimension": lambda path: np.save(path, _unit(6)[0]),
    "integers": lambda path: np.save(path, np.ones((6, 8), np.int64)),
    "text": lambda path: np.save(path, np.array([["a", "b"]])),
    "a NaN row": lambda path: np.save(path, _with_row(2, np.nan)),
    "an infinite row": lambda path: np.save(path, _with_row(4, np.inf)),
    "a zero row": lambda path: np.save(path, _with_row(1, 0.0)),
}


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("case", GALLERY_CASES)
def test_a_bad_gallery_is_one_line(case, converted, tmp_path, capsys) -> None:
    gallery = tmp_path / "real.npy"
    GALLERY_CASES[case](gallery)
    before = sorted(p.name for p in converted.iterdir())
    refused(capsys, ["report", str(converted), "--gallery", str(gallery)], gallery)
    assert sorted(p.name for p in converted.iterdir()) == before  # no report/ written


def test_gallery_rows_off_unit_norm_are_normalised_with_one_warning(
    converted, tmp_path, capsys, caplog
) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    rows = _unit(10)
    rows[[3, 7]] *= 20.0  # raw recognizer outputs
    rows[5] *= 1.0005  # within the tolerance
    gallery = tmp_path / "real.npy"
    np.save(gallery, rows)
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(out), "--gallery", str(gallery)]) == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "unit" in r.message]
    assert len(warnings) == 1, [r.message for r in warnings]
    assert str(gallery) in warnings[0].message and "2 of 10 rows" in warnings[0].message
    capsys.readouterr()

    from digi2real.data.embeddings import load_embeddings

    loaded = load_embeddings(gallery, mmap=True).embeddings
    assert np.allclose(np.linalg.norm(loaded, axis=1), 1.0, atol=1e-6)
    assert np.allclose(loaded[3], rows[3] / np.linalg.norm(rows[3]), atol=1e-6)
    # within the tolerance: not counted (normalised with the others once a copy is made)
    assert np.allclose(loaded[5], rows[5] / np.linalg.norm(rows[5]), atol=1e-6)
    unit = tmp_path / "unit.npy"
    np.save(unit, _unit(10))
    assert isinstance(load_embeddings(unit, mmap=True).embeddings, np.memmap)  # left mapped
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["leakage"] is not None


# -- checkpoints and ONNX models: evaluate verify and evaluate train --resume ---------------


class Sentinel:
    """Pickles as a call of ``function(*args)``: what a hostile checkpoint does on load."""

    def __init__(self, function: object, *args: object) -> None:
        self.reduced = (function, args)

    def __reduce__(self) -> tuple:
        return self.reduced


def _digi2real_checkpoint(**fields: object) -> dict:
    return {"format": 1, **fields}


@pytest.fixture()
def bins(tmp_path: Path) -> Path:
    folder = tmp_path / "bins"
    folder.mkdir()
    (folder / "lfw.bin").write_bytes(b"never read: the model is refused first")
    return folder


def test_a_malicious_checkpoint_is_refused_unexecuted(bins, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    for name, payload in {
        "print.pt": Sentinel(print, "pwned"),
        "mkdir.pt": Sentinel(os.mkdir, str(marker)),
        "nested.pt": _digi2real_checkpoint(config={"backbone": Sentinel(os.mkdir, str(marker))}),
        "protocol4.pt": pickle.dumps(Sentinel(os.mkdir, str(marker)), protocol=4),
    }.items():
        checkpoint = tmp_path / name
        if isinstance(payload, bytes):  # a raw pickle, not torch.save's archive
            checkpoint.write_bytes(payload)
        else:
            torch.save(payload, checkpoint)
        argv = ["evaluate", "verify", str(checkpoint), "--bins", str(bins), "--names", "lfw"]
        line = refused(capsys, argv, checkpoint)
        assert "refusing to unpickle" in line and "not a plain tensor checkpoint" in line
        assert not marker.exists()
    assert "pwned" not in capsys.readouterr().out


def _truncated_checkpoint(path: Path) -> None:
    torch.save(_digi2real_checkpoint(backbone={"w": torch.zeros(64)}), path)
    path.write_bytes(path.read_bytes()[:200])


CHECKPOINT_CASES: dict[str, Callable[[Path], None]] = {
    "random bytes": lambda path: path.write_bytes(os.urandom(512)),
    "empty": lambda path: path.write_bytes(b""),
    "a truncated archive": _truncated_checkpoint,
    "config a list": lambda path: torch.save(_digi2real_checkpoint(config=[1]), path),
    "weights that do not fit": lambda path: torch.save(
        _digi2real_checkpoint(
            config={"backbone": "small", "embedding_size": 8},
            world_size=1,
            num_classes=2,
            epoch=0,
            step=1,
            step_in_epoch=1,
            backbone={"fc.weight": torch.zeros(8, 3)},
            **{k: {} for k in ("head", "optimizer", "scheduler", "scaler", "rng")},
        ),
        path,
    ),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_evaluate_verify_on_a_corrupt_checkpoint(case, bins, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "ckpt" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    CHECKPOINT_CASES[case](checkpoint)
    argv = ["evaluate", "verify", str(checkpoint.parent), "--bins", str(bins), "--names", "lfw"]
    refused(capsys, argv, checkpoint)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage" + bytes(range(256))])
def test_evaluate_verify_on_a_corrupt_onnx_model(content, bins, tmp_path, capsys) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--names", "lfw"]
    refused(capsys, argv, model)


def test_a_corrupt_backbone_safetensors(bins, tmp_path, capsys) -> None:
    model = tmp_path / "backbone.safetensors"
    model.write_bytes(os.urandom(400))
    argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--names", "lfw"]
    refused(capsys, argv, model)


def _train_argv(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        *("evaluate", "train", str(data), "--out", str(ckpt), "--backbone", "small"),
        *("--epochs", "1", "--batch-size", "2", "--workers", "0", "--threads", "1"),
        *("--embedding-size", "8", "--no-progress", *extra),
    ]


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory) -> Path:
    """A real checkpoint after one step on the converted OUT."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    assert main(_train_argv(converted, ckpt, "--max-steps", "1")) == 0
    return ckpt / "checkpoint.pt"


def _head_of_another_run(path: Path, trained: Path) -> None:
    state = torch.load(trained, weights_only=True)
    state["head"] = {"weight": torch.zeros(5, 3)}
    torch.save(state, path)


RESUME_CASES: dict[str, Callable[[Path, Path], None]] = {
    "random bytes": lambda path, trained: path.write_bytes(os.urandom(512)),
    "truncated": lambda path, trained: path.write_bytes(trained.read_bytes()[:4096]),
    "malicious": lambda path, trained: torch.save(Sentinel(print, "pwned"), path),
    "a head that does not fit": _head_of_another_run,
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_train_resume_from_a_corrupt_checkpoint(case, converted, trained, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    RESUME_CASES[case](checkpoint, trained)
    kept = checkpoint.read_bytes()
    line = refused(capsys, _train_argv(converted, tmp_path, "--resume"), checkpoint)
    assert "pwned" not in capsys.readouterr().out and "pwned" not in line
    assert checkpoint.read_bytes() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing written


# -- a weights dir's manifest.json ----------------------------------------------------------


def _manifest(**entry: object) -> str:
    files = [{"path": "arcface.onnx", "size": 3, "sha256": "0" * 64, "component": "recognizer"}]
    files[0].update(entry)
    return json.dumps({"format": 1, "profile": "tiny", "digest": "0" * 64, "files": files})


MANIFEST_CASES: dict[str, str] = {
    "a list": "[1, 2]",
    "invalid JSON": '{"format": 1, "files": [',
    "not UTF-8": '{"format": "\xff"}',
    "files a mapping": json.dumps(
        {"format": 1, "profile": "tiny", "digest": "0" * 64, "files": {"a": 1}}
    ),
    "an entry a string": json.dumps(
        {"format": 1, "profile": "tiny", "digest": "0" * 64, "files": ["arcface.onnx"]}
    ),
    "a size as text": _manifest(size="3"),
    "no sha256": _manifest(sha256=None),
    "a path outside the dir": _manifest(path="../../outside.onnx"),
    "an absolute path": _manifest(path="/etc/hostname"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_weights_verify_on_a_bad_manifest(case, tmp_path, capsys) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(MANIFEST_CASES[case].encode("latin-1"))
    (tmp_path / "arcface.onnx").write_bytes(b"abc")
    refused(capsys, ["weights", "verify", "--dir", str(tmp_path)], manifest)


# -- a weights dir's face.json, an OUT's run.json ---------------------------------------------

FACE_CASES: dict[str, str] = {
    "not JSON": "{recognizer: ",
    "not UTF-8": "\xff\xfe{}",
    "a list": "[]",
    "a section a list": json.dumps({"recognizer": [1], "detector": {}}),
    "a mean as text": json.dumps({"recognizer": {"mean": "abc"}, "detector": {}}),
    "a threshold as text": json.dumps({"recognizer": {}, "detector": {"score_threshold": "x"}}),
}


@pytest.mark.parametrize("case", FACE_CASES)
def test_a_bad_face_json_is_one_error_naming_it(case, tmp_path) -> None:
    from digi2real.weights.face_config import FACE_CONFIG, load_face_config

    path = tmp_path / FACE_CONFIG
    path.write_bytes(FACE_CASES[case].encode("latin-1"))
    with pytest.raises(ValueError) as raised:
        load_face_config(tmp_path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("content", ['{"config": ', "[]", '{"config": {}, "derived": 3}'])
def test_a_damaged_run_json_refuses_the_rerun_and_changes_nothing(
    content, tiny_config, converted, tmp_path
) -> None:
    from helpers import fingerprint

    from digi2real.data.layout import OutLayout
    from digi2real.runner.convert import convert

    out = tmp_path / "out"
    shutil.copytree(converted, out)
    run_json = OutLayout(out).run_json
    run_json.write_text(content, encoding="utf-8")
    before = fingerprint(out)
    config = tiny_config(**{"source.identities": "first:2", "generation.steps": 2})
    with pytest.raises(ValueError, match="damaged; use another OUT, or --overwrite") as raised:
        convert(config, out, progress=False)
    assert str(run_json) in str(raised.value)
    assert fingerprint(out) == before
