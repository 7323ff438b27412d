from __future__ import annotations

import errno
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.data import fsio
from digi2real.data.writers import Sample, get_writer, sample_key
from digi2real.data.writers.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIODataset,
    RecordIOWriter,
    frame,
    iter_records,
    pack,
    read_index,
    read_record,
    unpack,
)

# images per label, in label order: 3 identities, 6 images
COUNTS = (2, 3, 1)


def _jpeg(seed: int, size: tuple[int, int] = (112, 112)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _samples(counts: tuple[int, ...] = COUNTS) -> list[Sample]:
    return [
        Sample(
            sample_key(label, index),
            label,
            f"id{label}",
            index,
            0,
            _jpeg(100 * label + index),
            {},
        )
        for label, count in enumerate(counts)
        for index in range(count)
    ]


def _write(out: Path, samples: list[Sample], **kwargs: object) -> Path:
    with get_writer("recordio", out, **kwargs) as writer:
        for sample in samples:
            writer.write(sample)
    return out / "rec"


def _frames(blob: bytes) -> list[tuple[int, int, bytes]]:
    """(cflag, length, data) of every physical frame, parsed by hand."""
    frames, pos = [], 0
    while pos < len(blob):
        magic, lrec = struct.unpack_from("<II", blob, pos)
        assert magic == MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        frames.append((cflag, length, blob[pos + 8 : pos + 8 + length]))
        pos += 8 + (length + 3) // 4 * 4
    return frames


def test_round_trip_every_image_and_label(tmp_path: Path) -> None:
    samples = _samples()
    rec = _write(tmp_path, samples)
    assert sorted(p.name for p in rec.iterdir()) == ["property", "train.idx", "train.rec"]
    dataset = RecordIODataset(rec)
    assert len(dataset) == len(samples) and dataset.num_classes == len(COUNTS)
    assert dataset.header0 == (len(samples) + 1, len(samples) + 1 + len(COUNTS))
    for position, sample in enumerate(samples):
        header, payload = unpack(dataset.read(position + 1))
        assert payload == sample.data
        assert (header.flag, header.label, header.id, header.id2) == (
            0,
            float(sample.label),
            position + 1,
            0,
        )
        image, label = dataset[position]
        expected = np.asarray(Image.open(io.BytesIO(sample.data)).convert("RGB"))
        assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
        np.testing.assert_array_equal(image, expected)
        assert label == sample.label
    assert (rec / "property").read_text() == "3,112,112\n"
    doubled = RecordIODataset(rec, transform=lambda image: image.shape)
    assert doubled[-1] == ((112, 112, 3), 2)


def test_byte_level_layout(tmp_path: Path) -> None:
    samples = _samples()
    rec = _write(tmp_path, samples)
    blob = (rec / "train.rec").read_bytes()
    n, classes = len(samples), len(COUNTS)

    # record 0: magic, lrec (cflag 0, 24 + 8 bytes), IfQQ (flag 2, label 0, id 0, id2 0),
    # then float32 [N + 1, N + 1 + classes]
    expected0 = struct.pack("<II", 0xCED7230A, 32)
    expected0 += struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", n + 1, n + 1 + classes)
    assert blob[:40] == expected0

    offsets = read_index(rec / "train.idx")
    assert sorted(offsets) == list(range(1 + n + classes))
    lines = (rec / "train.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and lines[1] == "1\t40"

    # image record 4 (label 1, its second image): header, JPEG, zero padding to 4
    jpeg = samples[3].data
    pos = offsets[4]
    length = 24 + len(jpeg)
    assert blob[pos : pos + 8] == struct.pack("<II", 0xCED7230A, length)
    assert blob[pos + 8 : pos + 32] == struct.pack("<IfQQ", 0, 1.0, 4, 0)
    assert blob[pos + 32 : pos + 32 + len(jpeg)] == jpeg
    padded = (length + 3) // 4 * 4
    assert blob[pos + 8 + length : pos + 8 + padded] == b"\0" * (padded - length)
    assert offsets[5] == pos + 8 + padded

    # identity records: label l covers image records [start, end)
    starts = np.cumsum((1, *COUNTS))
    for label in range(classes):
        pos = offsets[n + 1 + label]
        assert blob[pos : pos + 8] == struct.pack("<II", 0xCED7230A, 32)
        assert blob[pos + 8 : pos + 40] == struct.pack(
            "<IfQQff", 2, 0.0, n + 1 + label, 0, starts[label], starts[label + 1]
        )
    assert offsets[n + classes] + 40 == len(blob)

    # the index agrees with a sequential scan of the file
    assert [offset for offset, _ in iter_records(io.BytesIO(blob))] == [
        offsets[i] for i in sorted(offsets)
    ]


def test_two_writes_are_byte_identical(tmp_path: Path) -> None:
    samples = _samples()
    a, b = _write(tmp_path / "a", samples), _write(tmp_path / "b", samples, fsync=False)
    for name in ("train.rec", "train.idx", "property"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_frame_splits_at_aligned_magic_like_dmlc() -> None:
    # aligned magics at 0, 8, 16 and 20 (two in a row) and at the very end; one unaligned at 27
    record = MAGIC_BYTES + b"AAAA" + MAGIC_BYTES + b"BBBB" + MAGIC_BYTES + MAGIC_BYTES
    record += b"CCC" + MAGIC_BYTES + b"D" + MAGIC_BYTES
    assert len(record) == 36 and record.find(MAGIC_BYTES, 25) == 27
    framed = frame(record)
    assert [(c, n) for c, n, _ in _frames(framed)] == [
        (1, 0),
        (2, 4),
        (2, 4),
        (2, 0),
        (2, 8),
        (3, 0),
    ]
    assert [d for _, _, d in _frames(framed)][1:5] == [
        b"AAAA",
        b"BBBB",
        b"",
        b"CCC" + MAGIC_BYTES + b"D",
    ]
    assert read_record(io.BytesIO(framed), 0) == record

    # no aligned magic: one frame with cflag 0, padded
    plain = b"x" + MAGIC_BYTES + b"yz"
    assert frame(plain) == struct.pack("<II", MAGIC, 7) + plain + b"\0"


@pytest.mark.parametrize("seed", range(5))
def test_frame_round_trips_random_payloads(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pieces = [
        rng.bytes(int(rng.integers(0, 9))) if rng.random() < 0.6 else MAGIC_BYTES for _ in range(40)
    ]
    record = b"".join(pieces)
    framed = frame(record)
    assert len(framed) % 4 == 0
    aligned = sum(1 for i in range(0, len(record) - 3, 4) if record[i : i + 4] == MAGIC_BYTES)
    assert len(_frames(framed)) == aligned + 1
    stream = io.BytesIO(b"\0" * 12 + framed + frame(b"next"))
    assert read_record(stream, 12) == record
    assert read_record(stream, stream.tell()) == b"next"


def test_planted_magic_in_a_jpeg_round_trips(tmp_path: Path) -> None:
    samples = _samples((2, 1))
    jpeg = samples[1].data
    # trailing bytes after the JPEG end marker are ignored by decoders; the record is the
    # 24-byte IRHeader + data, so data offsets that are multiples of 4 are record-aligned
    planted = jpeg + b"\0" * (-len(jpeg) % 4) + MAGIC_BYTES + b"tail" + MAGIC_BYTES + b"x"
    samples[1] = Sample(samples[1].key, 0, "id0", 1, 0, planted, {})
    rec = _write(tmp_path, samples)
    offsets = read_index(rec / "train.idx")
    blob = (rec / "train.rec").read_bytes()
    parts = _frames(blob[offsets[2] : offsets[3]])
    assert [c for c, _, _ in parts] == [1, 2, 3]
    dataset = RecordIODataset(rec)
    assert unpack(dataset.read(2))[1] == planted
    image, label = dataset[1]
    np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert label == 0


def test_pack_unpack_match_mxnet_semantics() -> None:
    scalar = pack(IRHeader(7, 3.0, 11, 2), b"data")  # a scalar label forces flag 0
    assert scalar == struct.pack("<IfQQ", 0, 3.0, 11, 2) + b"data"
    header, payload = unpack(scalar)
    assert header == IRHeader(0, 3.0, 11, 2) and payload == b"data"
    vector = pack(IRHeader(0, [1.5, 2.0, 4.0], 5, 0), b"z")
    header, payload = unpack(vector)
    assert header.flag == 3 and header.id == 5 and payload == b"z"
    np.testing.assert_array_equal(header.label, np.float32([1.5, 2.0, 4.0]))
    with pytest.raises(ValueError, match="shorter than an IRHeader"):
        unpack(b"abc")


def test_read_record_rejects_garbage() -> None:
    framed = frame(MAGIC_BYTES + b"abcd")  # cflag 1 then 3
    with pytest.raises(ValueError, match="not a RecordIO record"):
        read_record(io.BytesIO(b"\0" * 16), 0)
    with pytest.raises(ValueError, match="continuation flag"):
        read_record(io.BytesIO(framed[:8] + frame(b"1234")), 0)
    with pytest.raises(ValueError, match="start flag"):
        read_record(io.BytesIO(framed), 8)
    with pytest.raises(ValueError, match="truncated"):
        read_record(io.BytesIO(framed[:-2]), 0)


def test_label_order_size_and_gaps(tmp_path: Path) -> None:
    samples = _samples()
    writer = RecordIOWriter(out_dir=tmp_path / "order")
    writer.write(samples[2])
    with pytest.raises(ValueError, match="non-decreasing label order"):
        writer.write(samples[0])
    with pytest.raises(ValueError, match="property has one size"):
        writer.write(Sample("k", 1, "x", 9, 0, _jpeg(1, (64, 64)), {}))
    writer.abort()
    assert not (tmp_path / "order" / "rec" / "train.rec").exists()

    # labels 1 and 3 have no image: empty ranges keep record N + 1 + label for label
    gaps = [s for s in _samples((1, 0, 2, 0, 1))]
    rec = _write(tmp_path / "gaps", gaps, image_size=(112, 112))
    dataset = RecordIODataset(rec)
    assert dataset.num_classes == 5 and [dataset[i][1] for i in range(4)] == [0, 2, 2, 4]
    ranges = [unpack(dataset.read(5 + label))[0].label.tolist() for label in range(5)]
    assert ranges == [[1, 2], [2, 2], [2, 4], [4, 4], [4, 5]]


@pytest.mark.parametrize(
    ("which", "name"),
    [
        (lambda call, data: call == 3, "train.rec"),  # an image record
        (lambda call, data: call == 11, "train.rec"),  # the header patched in at close
        (lambda call, data: data.startswith(b"0\t0\n"), "train.idx"),
        (lambda call, data: data.endswith(b",112,112\n"), "property"),
    ],
    ids=["image", "header", "idx", "property"],
)
def test_disk_full_while_writing_leaves_nothing_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: Any, name: str
) -> None:
    real = fsio._write_all
    calls: list[bytes] = []

    def write(fileobj, data) -> None:  # type: ignore[no-untyped-def]
        calls.append(bytes(data))
        if which(len(calls), bytes(data)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fileobj, data)

    monkeypatch.setattr(fsio, "_write_all", write)
    with pytest.raises(fsio.OutputWriteError, match=f"disk full while writing .*rec/{name}$"):
        _write(tmp_path, _samples())
    if name == "train.rec" and len(calls) == 11:
        assert calls[-1].startswith(MAGIC_BYTES) and len(calls[-1]) == 40
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == []


def test_disk_full_keeps_previous_complete_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _write(tmp_path, _samples())
    before = {p.name: p.read_bytes() for p in rec.iterdir()}

    def full(fileobj, data) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio, "_write_all", full)
    with pytest.raises(fsio.OutputWriteError):
        _write(tmp_path, _samples((1, 1)))
    assert {p.name: p.read_bytes() for p in rec.iterdir()} == before


def test_dataloader_workers_open_their_own_file(tmp_path: Path) -> None:
    samples = _samples()
    dataset = RecordIODataset(_write(tmp_path, samples))
    dataset[0]  # the parent opens the file first; workers must not reuse its offset
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    images, labels = zip(*loader, strict=True)
    assert torch.cat(labels).tolist() == [s.label for s in samples]
    assert torch.cat(images).shape == (len(samples), 112, 112, 3)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.rec"):
        RecordIODataset(tmp_path)


def test_failed_publish_never_pairs_new_rec_with_old_idx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, _samples())
    real_replace = fsio.os.replace

    def replace(src: str, dst: str | Path) -> None:
        if Path(dst).name == "train.idx":
            raise OSError(errno.EROFS, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(fsio.os, "replace", replace)
    with pytest.raises(fsio.OutputWriteError, match="output is read-only: .*train.idx"):
        _write(tmp_path, _samples((1, 2)))
    # the new train.rec is in, but neither the old idx nor property survive beside it
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == ["train.rec"]


def test_a_failed_write_poisons_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _samples()
    writer = RecordIOWriter(out_dir=tmp_path)
    writer.write(samples[0])
    real = fsio._write_all

    def full(fileobj, data) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio, "_write_all", full)
    with pytest.raises(fsio.OutputWriteError):
        writer.write(samples[1])
    monkeypatch.setattr(fsio, "_write_all", real)  # space again: still no silent corruption
    with pytest.raises(ValueError, match="failed write"):
        writer.write(samples[2])
    with pytest.raises(ValueError, match="failed write"):
        writer.close()
    writer.abort()
    assert list((tmp_path / "rec").iterdir()) == []
