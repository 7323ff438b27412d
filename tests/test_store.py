"""The storage layer on fsspec's in-memory store (no server): locations chosen from names,
fsio's writes as whole objects, listings, the node cache, the rank split, log redaction."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest

from digi2real.config import Config
from digi2real.data import fsio, node_cache
from digi2real.data.store import (
    ObjectPath,
    RedactCredentials,
    StorageAccessError,
    files_under,
    location,
)


@pytest.fixture
def mem() -> ObjectPath:
    """A fresh prefix in the process's memory store."""
    path = location(f"memory://bucket-{secrets.token_hex(4)}/out")
    assert isinstance(path, ObjectPath)
    return path


def test_a_location_is_chosen_once_from_its_name(tmp_path):
    assert location(str(tmp_path)) == tmp_path
    assert location(f"file://{tmp_path}") == tmp_path
    url = location("s3://bucket/a/b.parquet")
    assert isinstance(url, ObjectPath) and str(url) == "s3://bucket/a/b.parquet"
    assert (url.name, url.suffix, url.stem) == ("b.parquet", ".parquet", "b")
    assert url.parent / "c" == location("s3://bucket/a/c")
    assert str(url.relative_to(location("s3://bucket"))) == "a/b.parquet"
    assert url.with_suffix(".npy") == location("s3://bucket/a/b.npy")
    assert location("s3://bucket/") == location("s3://bucket")
    with pytest.raises(StorageAccessError, match="names no bucket"):
        location("s3://")
    with pytest.raises(StorageAccessError, match="credentials do not belong"):
        location("gs://user:token@bucket/x")


def test_fsio_writes_whole_objects_under_their_final_names(mem):
    target = mem / "a" / "one.bin"
    assert fsio.atomic_write_bytes(str(target), b"first") == target  # a URL string works too
    fsio.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and target.is_file()
    assert fsio.make_dirs(mem / "nothing") == mem / "nothing"  # a store has no folders
    assert fsio.remove_stale_temps(mem, recursive=True) == 0

    streamed = fsio.AtomicFile(mem / "b" / "stream.tar")
    assert isinstance(streamed, fsio.ObjectFile) and not streamed.seekable()
    streamed.write(b"abc")
    streamed.write(memoryview(b"def"))
    assert streamed.tell() == 6
    with pytest.raises(OSError, match="front to back"):
        streamed.seek(0)
    streamed.commit()
    assert (mem / "b" / "stream.tar").read_bytes() == b"abcdef"

    assert fsio.create_exclusive(mem / "marker.1", b"me")
    assert not fsio.create_exclusive(mem / "marker.1", b"someone else")
    assert (mem / "marker.1").read_bytes() == b"me"
    assert [rel for rel, _ in files_under(mem)] == [
        "a/one.bin",
        "b/stream.tar",
        "marker.1",
    ]
    fsio.remove_tree(mem / "a")
    fsio.remove(mem / "marker.1")
    fsio.remove(mem / "marker.1")  # already gone: nothing to do
    assert [rel for rel, _ in files_under(mem)] == ["b/stream.tar"]


def test_an_object_is_published_at_commit_and_never_when_discarded(s3):
    """On S3 (the session's moto server): nothing is visible before the commit; a large
    object goes up in parts, published whole; a discarded write leaves no object."""
    base = location(f"{s3.bucket('digi2real-store')}/{secrets.token_hex(4)}")
    big = secrets.token_bytes(12 * 2**20)  # over s3fs's 5 MiB minimum part: a multipart upload
    streamed = fsio.AtomicFile(base / "big.tar")
    for start in range(0, len(big), 2**20):
        streamed.write(big[start : start + 2**20])
    assert not (base / "big.tar").exists()
    streamed.commit()
    assert (base / "big.tar").read_bytes() == big
    with pytest.raises(RuntimeError), fsio.atomic_open(base / "never.tar") as handle:
        handle.write(big)
        raise RuntimeError("the writer failed")
    assert not (base / "never.tar").exists()
    assert s3.fs.call_s3("list_multipart_uploads", Bucket="digi2real-store").get("Uploads") in (
        None,
        [],
    )


def test_recordio_written_front_to_back_has_the_bytes_of_the_sought_one(tmp_path, mem):
    import io

    from PIL import Image

    from digi2real.data.writers import Sample, get_writer

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="JPEG")
    samples = [
        Sample(f"{label:07d}_{index:04d}", label, str(label), index, 0, buffer.getvalue())
        for label in (0, 2)
        for index in range(2)
    ]
    outputs = {}
    for name, out, options in (
        ("sought", tmp_path / "sought", {}),
        ("local", tmp_path / "front", {"expect": (4, 3)}),
        ("store", mem, {"expect": (4, 3)}),
    ):
        with get_writer("recordio", out, **options) as writer:
            for sample in samples:
                writer.write(sample)
        outputs[name] = {rel: path.read_bytes() for rel, path in files_under(location(out) / "rec")}
    assert outputs["sought"] == outputs["local"] == outputs["store"]
    with pytest.raises(ValueError, match="needs expect"), get_writer("recordio", mem / "x") as w:
        w.write(samples[0])
    wrong = get_writer("recordio", tmp_path / "wrong", expect=(5, 3))
    with pytest.raises(ValueError, match="expected 5 images"), wrong as writer:
        for sample in samples:
            writer.write(sample)


def test_a_source_on_a_store_scans_like_the_same_folder(tmp_path, mem, sample_dataset):
    from digi2real.data.readers import scan_dataset

    local = tmp_path / "src"
    for identity in sorted(p.name for p in sample_dataset.iterdir() if p.is_dir())[:2]:
        for image in sorted((sample_dataset / identity).iterdir())[:3]:
            fsio.atomic_write_bytes(local / identity / image.name, image.read_bytes())
    fsio.atomic_write_bytes(local / "stray.png", b"x")  # an image outside identity folders
    fsio.atomic_write_bytes(local / "nested" / "deeper" / "1.png", b"x")
    fsio.atomic_write_bytes(local / ".hidden" / "1.png", b"x")
    for rel, path in files_under(local):
        fsio.atomic_write_bytes(mem / rel, path.read_bytes())

    def described(root):
        sources, rows = scan_dataset(root)
        names = [(s.name, [str(f.relative_to(location(root))) for f in s.files]) for s in sources]
        return names, sorted((r.path, r.identity, r.reason) for r in rows)

    assert described(mem) == described(local)
    assert len(described(mem)[0]) == 2


def test_the_node_cache_fetches_an_object_once_and_again_when_it_changes(
    mem, tmp_path, monkeypatch
):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    fetched: list[int] = []
    read_many = node_cache.read_many

    def counting(paths):
        fetched.append(len(paths))
        return read_many(paths)

    monkeypatch.setattr(node_cache, "read_many", counting)
    images = [mem / "id" / f"{k}.png" for k in range(3)]
    for path in images:
        fsio.atomic_write_bytes(path, path.name.encode())
    local = node_cache.local_files([*images, tmp_path / "here.png", mem / "id" / "gone.png"])
    assert [p.read_bytes() for p in local[:3]] == [b"0.png", b"1.png", b"2.png"]
    assert local[3] == tmp_path / "here.png" and not local[4].exists()
    assert node_cache.local_files(images) == local[:3] and fetched == [3]
    fsio.atomic_write_bytes(images[1], b"changed!")
    again = node_cache.local_files(images)
    assert again[1].read_bytes() == b"changed!" and again[0] == local[0] and fetched == [3, 1]

    folder = node_cache.local_folder(mem / "id")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "0.png",
        "1.png",
        "2.png",
    ]
    assert node_cache.local_folder(mem / "id") == folder and fetched == [3, 1, 3]


@pytest.mark.parametrize(
    ("flags", "env", "split"),
    [
        ({}, {}, (1, 0)),
        ({}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "WORLD_SIZE": "2", "RANK": "1"}, (4, 3)),
        ({}, {"WORLD_SIZE": "2", "RANK": "1"}, (2, 1)),
        ({"run.num_nodes": 3}, {"SLURM_PROCID": "2"}, (3, 2)),
        ({"run.num_nodes": 5, "run.node_rank": 4}, {"SLURM_NTASKS": "2"}, (5, 4)),
    ],
)
def test_ranks_come_from_flags_then_slurm_then_torchrun(monkeypatch, flags, env, split):
    from digi2real.runner.nodes import NodeSplit, node_split

    for name in ("SLURM_NTASKS", "SLURM_PROCID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    got = node_split(Config.preset_named("tiny").override(flags))
    assert got == NodeSplit(*split)
    assert [shard for shard in range(10) if got.owns(shard)] == list(range(split[1], 10, split[0]))


def test_a_rank_outside_the_nodes_is_refused(monkeypatch):
    from digi2real.runner.nodes import node_split

    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(ValueError, match=r"SLURM_PROCID=2 is not a rank of SLURM_NTASKS=2"):
        node_split(Config.preset_named("tiny"))


def test_credential_values_never_reach_a_log_line(monkeypatch, caplog):
    secret = "a-secret-value-of-some-length"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    redact = RedactCredentials()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s done", (secret,), None)
    assert redact.filter(record) and record.getMessage() == "key=*** done"
    assert Path(__file__).is_file()
