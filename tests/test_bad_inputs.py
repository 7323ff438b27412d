"""Hostile and broken inputs end to end through `digi2real convert`: each one is a row in
errors.parquet (or a clear error), never a crash of the whole run, never a write outside OUT."""

from __future__ import annotations

import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from digi2real.cli import main

FORMATS = "imagefolder,webdataset,recordio"


def _huge_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A small PNG whose header claims width x height pixels (a decompression bomb)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    body = bytes(data[ihdr : ihdr + 17])
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(body))
    path.write_bytes(bytes(data))


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, bool]]:
    """(size, mtime_ns, is_link) of everything under ``root`` except ``skip``."""
    state = {}
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if Path(dirpath, d) != skip]
        for name in dirs + files:
            path = Path(dirpath, name)
            info = path.lstat()
            state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, path.is_symlink())
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dataset) -> dict[str, Path]:
    """A source full of traps beside an unrelated folder that symlinks point into."""
    base = tmp_path_factory.mktemp("bad")
    src, outside = base / "src", base / "outside"
    outside.mkdir()
    shutil.copy(sample_dataset / "1" / "0.png", outside / "secret.png")
    render = sample_dataset / "0" / "0.png"
    aligned = np.asarray(Image.open(render).convert("RGB"))

    shutil.copytree(sample_dataset / "0", src / "good")
    # file-level traps inside an otherwise usable identity
    bad = src / "bad files"
    shutil.copytree(sample_dataset / "1", bad)
    (bad / "5.png").write_bytes(b"")
    (bad / "6.png").write_bytes(render.read_bytes()[: render.stat().st_size // 2])
    (bad / "7.png").write_text("this is not an image")
    _huge_png(bad / "8.png")
    (bad / "9.png").symlink_to(outside / "secret.png")
    (bad / "nested").mkdir()
    # unusual pixel formats are converted, not rejected
    modes = src / "modes"
    modes.mkdir()
    Image.fromarray(aligned).convert("CMYK").save(modes / "0.jpg")
    Image.fromarray(aligned[..., 0].astype(np.uint16) * 257).save(modes / "1.png")
    rgba = np.dstack([aligned, np.full(aligned.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(modes / "2.png")
    Image.fromarray(aligned).convert("L").save(modes / "3.png")
    Image.fromarray(aligned).resize((200, 160)).save(modes / "4.png")  # not aligned
    # names
    shutil.copytree(sample_dataset / "2", src / "Jane Doe")
    shutil.copytree(sample_dataset / "3", src / "José Ñúñez")
    shutil.copytree(sample_dataset / "4", src / unicodedata.normalize("NFD", "Zoë"))
    shutil.copytree(sample_dataset / "5", src / unicodedata.normalize("NFC", "Renée"))
    shutil.copytree(sample_dataset / "5", src / unicodedata.normalize("NFD", "Renée"))
    shutil.copytree(sample_dataset / "5", src / "bell\x07name")
    shutil.copytree(sample_dataset / "5", src / "back\\slash")
    (src / "empty").mkdir()
    (src / "loop").symlink_to(src / "loop")
    (src / "escape").symlink_to(outside)
    shutil.copy(render, src / "stray.png")
    only_bad = src / "only bad"
    only_bad.mkdir()
    (only_bad / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    return {"base": base, "src": src, "outside": outside}


@pytest.fixture(scope="module")
def converted(world, tiny_weights) -> dict:
    out = world["base"] / "out"
    before = _snapshot(world["base"], out)
    argv = [
        "convert", str(world["src"]), str(out), "--weights", str(tiny_weights.root),
        "--preset", "tiny", "--steps", "1", "--outputs-per-identity", "1",
        "--shard-size", "3", "--formats", FORMATS, "-q",
    ]  # fmt: skip
    code = main(argv)
    return {"out": out, "code": code, "before": before, "after": _snapshot(world["base"], out)}


@pytest.fixture(autouse=True, scope="module")
def _keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _errors(out: Path) -> dict[str, dict]:
    return {row["path"]: row for row in pq.read_table(out / "errors.parquet").to_pylist()}


def test_the_run_completes_with_the_usable_identities(converted):
    assert converted["code"] == 0
    out = converted["out"]
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    identities = {row["identity"] for row in rows}
    assert identities == {"Jane Doe", "José Ñúñez", "Zoë", "bad files", "good", "modes"}
    for row in rows:
        assert (out / row["path"]).is_file()
    assert (out / "images" / "Zoë").is_dir()  # the NFC name, whatever the folder's form
    labels = (out / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [line.split(",", 1)[1] for line in labels] == sorted(identities)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("bad files/5.png", "empty file"),
        ("bad files/6.png", "truncated"),
        ("bad files/7.png", "not an image"),
        ("bad files/8.png", "too large"),
        ("bad files/9.png", "symlink resolves outside the dataset root"),
        ("bad files/nested", "nested folder ignored"),
        ("empty", "no image files"),
        ("loop", "symlink loop"),
        ("escape", "symlink resolves outside the dataset root"),
        ("stray.png", "image outside identity folder"),
        ("bell\x07name", "control characters"),
        ("back\\slash", "backslash"),
        (unicodedata.normalize("NFC", "Renée"), "collides after NFC"),
        (unicodedata.normalize("NFD", "Renée"), "collides after NFC"),
        ("only bad", "too few usable images"),
        ("only bad/0.png", "corrupt"),
    ],
)
def test_each_bad_input_is_an_error_row(converted, path, reason):
    errors = _errors(converted["out"])
    assert path in errors, sorted(errors)
    assert reason in errors[path]["reason"]


def test_unusual_pixel_formats_are_converted_not_rejected(converted):
    errors = _errors(converted["out"])
    assert not [p for p in errors if p.startswith("modes/")]


def test_nothing_is_written_outside_out(converted, world):
    assert converted["before"] == converted["after"]
    out = converted["out"].resolve()
    for path in converted["out"].rglob("*"):
        assert not path.is_symlink(), path
        assert path.resolve().is_relative_to(out), path
    assert sorted(p.name for p in world["outside"].iterdir()) == ["secret.png"]


def test_hostile_identity_selection_is_a_clear_error(world, tiny_weights, tmp_path, capsys):
    for spec in ("names:..", "names:../outside", "names:/etc", "names:good,good"):
        out = tmp_path / "out"
        argv = ["convert", str(world["src"]), str(out), "--weights", str(tiny_weights.root)]
        assert main([*argv, "--preset", "tiny", "--identities", spec, "-q"]) == 2, spec
        assert "error:" in capsys.readouterr().err
        assert not out.exists() or not any(out.rglob("*.jpg"))


def test_a_face_that_cannot_be_found_is_a_row(
    world, tiny_weights, tiny_config, tmp_path, sample_dataset
):
    """Without the tiny profile's centre-crop fallback: a non-aligned source with no
    detectable face is a row, and generated images without a face are rejections."""
    src = tmp_path / "src"
    shutil.copytree(world["src"] / "modes", src / "unaligned")
    for name in ("0.jpg", "1.png", "2.png", "3.png"):
        (src / "unaligned" / name).unlink()
    shutil.copytree(sample_dataset / "0", src / "aligned")
    config = tiny_config(src, **{"filter.fallback": "none"})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["convert", str(src), str(out), "--config", str(config_path), "--steps", "1"]
    argv += ["--weights", str(tiny_weights.root), "--outputs-per-identity", "1", "-q"]
    assert main(argv) == 0
    errors = _errors(out)
    assert errors["unaligned/4.png"]["reason"] == "no face detected"
    assert errors["unaligned/4.png"]["stage"] == "detect"
    assert "too few usable images" in errors["unaligned"]["reason"]
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert [r["identity"] for r in rejected] == ["aligned"]
    assert rejected[0]["reason"] == "no face detected"
