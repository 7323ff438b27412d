"""insightface's training RecordIO (``train.rec``/``train.idx``/``property``) without mxnet.

The container is dmlc-core's RecordIO. Each record is framed as little-endian uint32
``MAGIC``, uint32 ``lrec = cflag << 29 | length``, ``length`` bytes, zero padding to a
multiple of 4. A payload holding the magic at a 4-byte-aligned offset is split there the way
dmlc's ``RecordIOWriter::WriteRecord`` does it: the magic is dropped, the parts get cflag 1
(first), 2 (middle) and 3 (last), and the reader puts the magic back between parts. A
record that needs no split has cflag 0.

A record's payload is MXNet's ``IRHeader`` (``struct 'IfQQ'``: flag, label, id, id2) then,
when ``flag > 0``, ``flag`` float32 labels (the scalar label is then 0), then the data.
insightface's layout (what ``recognition/arcface_torch`` ``MXFaceDataset`` and the older
MXNet face iterators read):

- record 0: ``flag 2``, label ``[N + 1, N + 1 + num_classes]``, no data; arcface_torch
  takes images ``1 .. label[0] - 1``;
- records ``1 .. N``: ``flag 0``, label = class id, ``id`` = record index, JPEG bytes, in
  non-decreasing class order;
- records ``N + 1 .. N + num_classes``: one per class, ``flag 2``, label = ``[start, end)``
  of that class's image records.

``train.idx`` lines are ``"<index>\\t<byte offset>\\n"``; ``property`` is
``"<num_classes>,<height>,<width>\\n"``. Indices and labels are float32 in this format, so
at most 2**24 records are exact.
"""

from __future__ import annotations

import io
import logging
import numbers
import os
import struct
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from digi2real.data import fsio, layout
from digi2real.data.images import open_image
from digi2real.data.store import ObjectPath
from digi2real.data.writers import Sample, Writer, register_writer

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_LENGTH = (1 << 29) - 1
# mxnet packs with native 'IfQQ'; every platform it ships on is little-endian, where that is
# these 24 bytes without padding
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)
FLOAT32_EXACT = 1 << 24


class IRHeader(NamedTuple):
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes = b"") -> bytes:
    """MXNet's ``recordio.pack``: a scalar label goes in the header, a vector after it."""
    if isinstance(header.label, numbers.Real):
        head = struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2)
        return head + payload
    labels = np.asarray(header.label, dtype="<f4").reshape(-1)
    head = struct.pack(IR_FORMAT, labels.size, 0.0, header.id, header.id2)
    return head + labels.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """MXNet's ``recordio.unpack``: (header, data); a vector label comes back as float32."""
    if len(record) < IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than an IRHeader")
    flag, label, ident, ident2 = struct.unpack_from(IR_FORMAT, record)
    payload = record[IR_SIZE:]
    if flag > 0:
        if len(payload) < 4 * flag:
            raise ValueError(f"record says {flag} float labels but has {len(payload)} bytes")
        labels = np.frombuffer(payload, dtype="<f4", count=flag).astype(np.float32)
        return IRHeader(flag, labels, ident, ident2), payload[4 * flag :]
    return IRHeader(flag, label, ident, ident2), payload


def _lrec(cflag: int, length: int) -> bytes:
    return MAGIC_BYTES + struct.pack("<I", (cflag << 29) | length)


def frame(record: bytes) -> bytes:
    """``record`` framed for the file, split at aligned magics like dmlc's writer."""
    if len(record) > MAX_LENGTH:
        raise ValueError(f"RecordIO records are limited to 2**29 - 1 bytes, got {len(record)}")
    chunks: list[bytes] = []
    start = 0
    search = 0
    while True:
        found = record.find(MAGIC_BYTES, search)
        if found < 0:
            break
        if found % 4:
            search = found + 1
            continue
        chunks += [_lrec(1 if start == 0 else 2, found - start), record[start:found]]
        start = search = found + 4
    chunks += [_lrec(3 if start else 0, len(record) - start), record[start:]]
    chunks.append(b"\0" * (-len(record) % 4))
    return b"".join(chunks)


def read_record(fileobj: BinaryIO, offset: int) -> bytes:
    """The record starting at ``offset``, continuation parts joined back."""
    fileobj.seek(offset)
    parts: list[bytes] = []
    position = offset
    while True:
        head = fileobj.read(8)
        if len(head) != 8:
            raise ValueError(f"truncated RecordIO file: no record header at offset {position}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ValueError(f"not a RecordIO record at offset {position} (magic {magic:#x})")
        cflag, length = lrec >> 29, lrec & MAX_LENGTH
        if cflag not in ((0, 1) if not parts else (2, 3)):
            where = "start" if not parts else "continuation"
            raise ValueError(f"bad RecordIO {where} flag {cflag} at offset {position}")
        padded = (length + 3) & ~3
        body = fileobj.read(padded)
        if len(body) != padded:
            raise ValueError(f"truncated RecordIO record at offset {position}")
        parts.append(body[:length])
        position += 8 + padded
        if cflag in (0, 3):
            return b"".join(parts)
        parts.append(MAGIC_BYTES)


def iter_records(fileobj: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(offset, record) for every record of the file, in order."""
    offset = fileobj.seek(0, os.SEEK_END)
    end, offset = offset, 0
    while offset < end:
        record = read_record(fileobj, offset)
        yield offset, record
        offset = fileobj.tell()


def read_index(path: str | Path) -> dict[int, int]:
    """``train.idx`` as {record index: byte offset}."""
    offsets: dict[int, int] = {}
    with open(path, encoding="ascii") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected '<index>\\t<offset>', got {line!r}")
            offsets[int(fields[0])] = int(fields[1])
    return offsets


def _image_size(data: bytes, key: str) -> tuple[int, int]:
    try:
        with open_image(io.BytesIO(data), path=f"sample {key!r}") as image:
            width, height = image.size
    except Exception as error:  # PIL raises several types for undecodable bytes
        raise ValueError(f"sample {key!r}: data is not a readable image ({error})") from error
    return height, width


@register_writer("recordio")
class RecordIOWriter(Writer):
    """``out_dir/rec/{train.rec,train.idx,property}`` in insightface's layout.

    Samples must come in non-decreasing label order. Labels with no image (a gap, or a first
    label above 0) get an empty identity range, so record ``N + 1 + label`` always belongs to
    ``label``. ``image_size`` (height, width) defaults to the first image's; every image must
    match it, since ``property`` declares one size.

    Record 0 holds counts known only at the end. ``expect=(images, classes)`` gives them up
    front (checked at :meth:`close`), so the file is written front to back, as an object on a
    store must be; without it, record 0's slot is reserved and filled by a seek at the end.
    """

    HEADER_SLOT = len(frame(pack(IRHeader(2, [0.0, 0.0], 0, 0))))

    def __init__(
        self,
        *,
        out_dir: str | Path | ObjectPath,
        image_size: tuple[int, int] | None = None,
        expect: tuple[int, int] | None = None,
        fsync: bool = True,
    ) -> None:
        super().__init__(out_dir=out_dir)
        self.expect = expect
        self.rec_dir = self.out_dir / layout.RECORDIO
        self.image_size: tuple[int, int] | None = None
        if image_size is not None:
            self.image_size = (int(image_size[0]), int(image_size[1]))
        self.fsync = fsync
        self._rec: fsio.AtomicFile | None = None
        self._pending: list[fsio.AtomicFile] = []
        self._offsets = array("Q", [0])
        # _starts[label] = record index of that label's first image
        self._starts: list[int] = []
        self._last_label = -1
        self.count = 0

    def _open_rec(self) -> fsio.AtomicFile:
        if self._rec is None:
            self._rec = fsio.AtomicFile(self.rec_dir / layout.RECORDIO_DATA, fsync=self.fsync)
            self._pending.append(self._rec)
            if self.expect is not None:
                images, classes = self.expect
                self._rec.write(self._header(images + 1, images + 1 + classes))
            elif not self._rec.seekable():
                raise ValueError(
                    f"{self.rec_dir}: RecordIO on a store needs expect=(images, classes): an "
                    "object cannot be sought back into"
                )
            else:
                # record 0 needs counts known only at the end: reserve its fixed-size slot
                self._rec.write(b"\0" * self.HEADER_SLOT)
        return self._rec

    def _header(self, first_identity: int, end: int) -> bytes:
        header = frame(pack(IRHeader(2, [float(first_identity), float(end)], 0, 0)))
        if len(header) != self.HEADER_SLOT:  # cannot happen: labels are positive floats
            raise RuntimeError(
                f"RecordIO header is {len(header)} bytes, slot has {self.HEADER_SLOT}"
            )
        return header

    def _append(self, rec: fsio.AtomicFile, record: bytes) -> int:
        index = len(self._offsets)
        if index >= FLOAT32_EXACT:
            raise ValueError(f"RecordIO indices are float32: at most {FLOAT32_EXACT} records")
        framed = frame(record)
        offset = rec.tell()
        try:
            rec.write(framed)
        except BaseException as error:
            self._poison(error)
            raise
        self._offsets.append(offset)
        return index

    def write(self, sample: Sample) -> None:
        self._check_open()
        if sample.label < self._last_label:
            raise ValueError(
                f"RecordIO needs samples in non-decreasing label order: label {sample.label} "
                f"(key {sample.key!r}) came after label {self._last_label}"
            )
        if not 0 <= sample.label < FLOAT32_EXACT:
            raise ValueError(f"label {sample.label} out of range [0, {FLOAT32_EXACT})")
        size = _image_size(sample.data, sample.key)
        if self.image_size is None:
            self.image_size = size
        elif size != self.image_size:
            raise ValueError(
                f"sample {sample.key!r} is {size[0]}x{size[1]}, but this RecordIO holds "
                f"{self.image_size[0]}x{self.image_size[1]} images (property has one size)"
            )
        rec = self._open_rec()
        index = len(self._offsets)
        while len(self._starts) <= sample.label:
            self._starts.append(index)
        self._append(rec, pack(IRHeader(0, float(sample.label), index, 0), sample.data))
        self._last_label = sample.label
        self.count += 1

    def _close(self) -> None:
        if self.image_size is None:
            raise ValueError(
                f"RecordIO in {self.rec_dir}: no samples written and no image_size given"
            )
        rec = self._open_rec()
        first_identity = len(self._offsets)
        num_classes = len(self._starts)
        ends = [*self._starts[1:], first_identity]
        empty = [label for label in range(num_classes) if self._starts[label] == ends[label]]
        if empty:
            logger.warning("RecordIO: %d labels have no image, e.g. %s", len(empty), empty[:5])
        for start, end in zip(self._starts, ends, strict=True):
            index = len(self._offsets)
            self._append(rec, pack(IRHeader(2, [float(start), float(end)], index, 0)))
        if self.expect is None:
            rec.seek(0)
            rec.write(self._header(first_identity, len(self._offsets)))
        elif self.expect != (first_identity - 1, num_classes):
            raise ValueError(
                f"RecordIO in {self.rec_dir}: expected {self.expect[0]} images of "
                f"{self.expect[1]} classes, got {first_identity - 1} of {num_classes}"
            )

        # an old idx beside the new rec would look complete and be wrong: drop it (and the
        # property, published last) before the new ones exist anywhere, even as an object
        # in the making
        for name in (layout.RECORDIO_PROPERTY, layout.RECORDIO_INDEX):
            fsio.remove(self.rec_dir / name)
        index_file = fsio.AtomicFile(self.rec_dir / layout.RECORDIO_INDEX, fsync=self.fsync)
        self._pending.append(index_file)
        lines: list[str] = []
        for index, offset in enumerate(self._offsets):
            lines.append(f"{index}\t{offset}\n")
            if len(lines) >= 65536:
                index_file.write("".join(lines).encode("ascii"))
                lines.clear()
        index_file.write("".join(lines).encode("ascii"))
        height, width = self.image_size
        prop = fsio.AtomicFile(self.rec_dir / layout.RECORDIO_PROPERTY, fsync=self.fsync)
        self._pending.append(prop)
        prop.write(f"{num_classes},{height},{width}\n".encode("ascii"))
        for handle in self._pending:
            handle.sync()
        # the rec, its idx, and property last
        for handle in (rec, index_file, prop):
            handle.commit()
        self._pending.clear()
        logger.info(
            "wrote %s: %d images, %d classes", self.rec_dir, first_identity - 1, num_classes
        )

    def abort(self) -> None:
        for handle in self._pending:
            handle.discard()
        self._pending.clear()
        super().abort()


class RecordIODataset:
    """A ``train.rec`` folder as (image, label) pairs, read like arcface_torch's MXFaceDataset.

    A map-style dataset by protocol (``__len__``/``__getitem__``): torch's DataLoader takes it
    as it is, and writing RecordIO does not import torch.

    ``image`` is HxWx3 uint8 RGB (what ``mx.image.imdecode`` gives), or ``transform(image)``.
    The file is opened lazily in each process, so DataLoader workers never share one file
    offset.
    """

    def __init__(
        self, rec_dir: str | Path, transform: Callable[[np.ndarray], Any] | None = None
    ) -> None:
        self.rec_dir = Path(rec_dir)
        self.rec_path = self.rec_dir / layout.RECORDIO_DATA
        for path in (self.rec_path, self.rec_dir / layout.RECORDIO_INDEX):
            if not path.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {path}")
        self.transform = transform
        self.offsets = read_index(self.rec_dir / layout.RECORDIO_INDEX)
        self._file: BinaryIO | None = None
        self._pid: int | None = None
        header, _ = unpack(self.read(0))
        self.header0: tuple[int, int] | None = None
        self.num_classes: int | None
        if header.flag > 0:
            labels = np.asarray(header.label)
            self.header0 = (int(labels[0]), int(labels[1]))
            self.imgidx = np.arange(1, self.header0[0], dtype=np.int64)
            self.num_classes = self.header0[1] - self.header0[0]
        else:
            self.imgidx = np.asarray(list(self.offsets), dtype=np.int64)
            self.num_classes = self._property_classes()
        self.close()

    def _property_classes(self) -> int | None:
        prop = self.rec_dir / layout.RECORDIO_PROPERTY
        if not prop.is_file():
            return None
        return int(prop.read_text(encoding="ascii").split(",")[0])

    def read(self, index: int) -> bytes:
        """The raw record ``index`` (as ``MXIndexedRecordIO.read_idx``)."""
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")  # noqa: SIM115 - kept open across calls
            self._pid = os.getpid()
        try:
            offset = self.offsets[index]
        except KeyError:
            raise IndexError(
                f"record {index} is not in {self.rec_dir / layout.RECORDIO_INDEX}"
            ) from None
        return read_record(self._file, offset)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.imgidx)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        header, payload = unpack(self.read(int(self.imgidx[index])))
        label = header.label
        if not isinstance(label, numbers.Real):
            label = np.asarray(label).reshape(-1)[0]
        # a .rec handed in (a public training set) is untrusted: allowed formats only, no bomb
        with open_image(io.BytesIO(payload), path=f"{self.rec_dir} record {index}") as image:
            pixels = np.asarray(image.convert("RGB"))
        return (pixels if self.transform is None else self.transform(pixels)), int(label)
