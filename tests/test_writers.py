from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from digi2real.data import fsio
from digi2real.data.writers import (
    WRITERS,
    Sample,
    get_writer,
    sample_key,
)
from digi2real.data.writers.imagefolder import ImageFolderWriter
from digi2real.data.writers.webdataset import WebDatasetWriter


def _jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _samples() -> list[Sample]:
    # (identity, label, index, shard), in shard order like the manifest
    rows = [("alice", 0, 0, 0), ("alice", 0, 1, 0), ("bob", 1, 0, 0), ("carol", 2, 3, 1)]
    rows += [("Zoë K", 3, 0, 1), ("Zoë K", 3, 2, 1)]
    return [
        Sample(
            key=sample_key(label, index),
            label=label,
            identity=identity,
            index=index,
            shard=shard,
            data=_jpeg(10 * label + index),
            meta={"identity": identity, "similarity": 0.5 + label / 10, "index": index},
        )
        for identity, label, index, shard in rows
    ]


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_sample_key_sorts_like_label_then_index() -> None:
    assert sample_key(12, 3) == "0000012_0003"
    pairs = [(3, 10), (0, 2), (12, 0), (3, 2), (0, 100)]
    keys = [sample_key(*pair) for pair in pairs]
    assert sorted(keys) == [sample_key(*pair) for pair in sorted(pairs)]
    assert all("." not in key for key in keys)
    with pytest.raises(ValueError, match="label >= 0"):
        sample_key(-1, 0)


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert sorted(WRITERS) == ["imagefolder", "recordio", "webdataset"]
    writer = get_writer("webdataset", tmp_path, fsync=False)
    assert isinstance(writer, WebDatasetWriter) and writer.out_dir == tmp_path
    with pytest.raises(ValueError, match=r"'lmdb'.*valid choices.*imagefolder.*webdataset"):
        get_writer("lmdb", tmp_path)
    with pytest.raises(TypeError):
        ImageFolderWriter(tmp_path)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    "first", ["digi2real.data.writers.webdataset", "digi2real.data.writers.recordio"]
)
def test_registry_complete_whatever_is_imported_first(first: str) -> None:
    code = f"import {first}\nfrom digi2real.data.writers import WRITERS\nprint(sorted(WRITERS))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "['imagefolder', 'recordio', 'webdataset']"


def test_imagefolder_layout(tmp_path: Path) -> None:
    samples = _samples()
    with get_writer("imagefolder", tmp_path) as writer:
        for sample in samples:
            writer.write(sample)
    for sample in samples:
        rel = ImageFolderWriter.relative_path(sample.identity, sample.index)
        assert rel == f"images/{sample.identity}/{sample.index:04d}.jpg"
        assert (tmp_path / rel).read_bytes() == sample.data
    assert _visible(tmp_path / "images") == ["Zoë K", "alice", "bob", "carol"]
    assert _visible(tmp_path / "images" / "alice") == ["0000.jpg", "0001.jpg"]


def test_imagefolder_refuses_unusable_identity(tmp_path: Path) -> None:
    writer = ImageFolderWriter(out_dir=tmp_path)
    bad = Sample("k", 0, "../escape", 0, 0, b"x", {})
    with pytest.raises(ValueError, match="unusable path component"):
        writer.write(bad)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "images").exists()


def test_imagefolder_normalises_identity_to_nfc(tmp_path: Path) -> None:
    writer = ImageFolderWriter(out_dir=tmp_path, fsync=False)
    writer.write(Sample("k", 0, "Zoe\u0308", 7, 0, b"jpeg", {}))
    assert (tmp_path / "images" / "Zo\u00eb" / "0007.jpg").read_bytes() == b"jpeg"


def _write_wds(out: Path, samples: list[Sample]) -> list[Path]:
    with get_writer("webdataset", out) as writer:
        for sample in samples:
            writer.write(sample)
    assert isinstance(writer, WebDatasetWriter)
    return writer.written


def test_webdataset_is_read_back_unchanged_by_the_library(tmp_path: Path) -> None:
    samples = _samples()
    written = _write_wds(tmp_path, samples)
    assert [p.name for p in written] == ["shard-000000.tar", "shard-000001.tar"]
    assert _visible(tmp_path / "wds") == ["shard-000000.tar", "shard-000001.tar"]
    urls = [str(p) for p in written]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in read] == [s.key for s in samples]
    for record, sample in zip(read, samples, strict=True):
        assert record["jpg"] == sample.data
        assert json.loads(record["json"]) == sample.meta
        assert int(record["cls"]) == sample.label
    decoded = list(
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("rgb8")
        .to_tuple("jpg", "cls")
    )
    expected = np.asarray(Image.open(io.BytesIO(samples[0].data)).convert("RGB"))
    np.testing.assert_array_equal(decoded[0][0], expected)
    assert [label for _, label in decoded] == [s.label for s in samples]


def test_webdataset_tar_headers_are_deterministic(tmp_path: Path) -> None:
    samples = _samples()
    first = _write_wds(tmp_path / "a", samples)
    second = _write_wds(tmp_path / "b", samples)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            f"{s.key}.{ext}" for s in samples[:3] for ext in ("jpg", "cls", "json")
        ]
        for member in members:
            assert (member.mtime, member.uid, member.gid) == (0, 0, 0)
            assert (member.uname, member.gname, member.mode) == ("", "", 0o644)
            assert member.isreg() and not member.pax_headers
        meta = tar.extractfile(members[2]).read()  # type: ignore[union-attr]
    assert meta == json.dumps(samples[0].meta, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in meta
    # ustar magic: no GNU or PAX extension headers for these short ASCII names
    assert first[0].read_bytes()[257:263] == b"ustar\x00"


def test_webdataset_refuses_bad_keys_and_regrouped_shards(tmp_path: Path) -> None:
    writer = WebDatasetWriter(out_dir=tmp_path)
    sample = _samples()[0]
    with pytest.raises(ValueError, match="WebDataset key"):
        writer.write(Sample("a.b", 0, "x", 0, 0, b"j", {}))
    writer.write(sample)
    with pytest.raises(ValueError, match="duplicate key"):
        writer.write(sample)
    writer.write(Sample("0000001_0000", 1, "y", 0, 1, b"j", {}))
    with pytest.raises(ValueError, match="grouped by shard"):
        writer.write(Sample("0000002_0000", 2, "z", 0, 0, b"j", {}))
    writer.abort()


def test_webdataset_exception_keeps_committed_shards_only(tmp_path: Path) -> None:
    samples = _samples()
    with pytest.raises(RuntimeError, match="stop"), get_writer("webdataset", tmp_path) as writer:
        for sample in samples[:4]:  # all of shard 0, the start of shard 1
            writer.write(sample)
        raise RuntimeError("stop")
    assert _visible(tmp_path / "wds") == ["shard-000000.tar"]
    read = list(wds.WebDataset([str(tmp_path / "wds" / "shard-000000.tar")], shardshuffle=False))
    assert [r["__key__"] for r in read] == [s.key for s in samples[:3]]


def test_webdataset_disk_full_leaves_no_partial_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _write_wds(tmp_path / "ref", _samples())
    room = reference[0].stat().st_size + 1000  # shard 0 fits, shard 1 does not
    real = fsio._write_all
    written = []

    def fill_up(fileobj, data) -> None:  # type: ignore[no-untyped-def]
        written.append(len(data))
        if sum(written) > room:
            raise OSError(28, "No space left on device")
        real(fileobj, data)

    monkeypatch.setattr(fsio, "_write_all", fill_up)
    out = tmp_path / "out"
    with pytest.raises(fsio.OutputWriteError, match="disk full while writing .*shard-000001"):
        _write_wds(out, _samples())
    assert _visible(out / "wds") == ["shard-000000.tar"]
    assert (out / "wds" / "shard-000000.tar").read_bytes() == reference[0].read_bytes()
