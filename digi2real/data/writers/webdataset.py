"""WebDataset shards: ``out_dir/wds/shard-NNNNNN.tar``, one tar per plan shard.

Each sample becomes ``<key>.jpg`` (the JPEG bytes unchanged), ``<key>.cls`` (the label as
decimal text, WebDataset's convention for class ids) and ``<key>.json`` (``meta``, sorted
keys, compact). Tar headers carry nothing time-, user- or host-dependent, so the same
samples give byte-identical shards. A shard is written under a temporary name and renamed
in when the next shard starts or the writer closes; on an object store it streams to its
object (a multipart upload once large), published whole at that moment.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

from digi2real.data import fsio, layout
from digi2real.data.store import ObjectPath
from digi2real.data.writers import Sample, Writer, register_writer

logger = logging.getLogger(__name__)

MEMBER_MODE = 0o644


def shard_name(shard: int) -> str:
    if shard < 0:
        raise ValueError(f"shard number must be >= 0, got {shard}")
    return layout.webdataset_shard_name(shard)


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _check_key(key: str) -> None:
    # WebDataset takes everything before the first dot of the basename as the key
    if not key or "." in key or "/" in key or "\\" in key or not key.isprintable():
        raise ValueError(f"unusable WebDataset key {key!r}: needs a non-empty name without '.'")


@register_writer("webdataset")
class WebDatasetWriter(Writer):
    """Tars grouped by ``sample.shard``; samples of one shard must arrive together."""

    def __init__(self, *, out_dir: str | Path | ObjectPath, fsync: bool = True) -> None:
        super().__init__(out_dir=out_dir)
        self.wds_dir = self.out_dir / layout.WEBDATASET
        self.fsync = fsync
        self.written: list[Path | ObjectPath] = []
        self._done: set[int] = set()
        self._shard: int | None = None
        self._file: fsio.AtomicFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()

    def _start(self, shard: int) -> None:
        self._file = fsio.AtomicFile(self.wds_dir / shard_name(shard), fsync=self.fsync)
        # PAX only adds extended headers for what USTAR cannot hold (long or non-ASCII
        # names); for our short ASCII keys the output is plain USTAR
        tar = tarfile.open(  # noqa: SIM115 - closed by _finish, across write() calls
            fileobj=self._file,  # type: ignore[arg-type]
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
        )
        self._tar, self._shard, self._keys = tar, shard, set()

    def _finish(self) -> None:
        if self._tar is None or self._file is None or self._shard is None:
            return
        self._tar.close()
        self.written.append(self._file.commit())
        self._done.add(self._shard)
        logger.debug("wrote %s", self._file.path)
        self._tar, self._file, self._shard = None, None, None

    def write(self, sample: Sample) -> None:
        self._check_open()
        _check_key(sample.key)
        shard_name(sample.shard)  # refuses a negative shard before anything is written
        new_shard = self._tar is None or sample.shard != self._shard
        if new_shard and sample.shard in self._done:
            raise ValueError(
                f"shard {sample.shard} was already written; samples must arrive grouped by shard"
            )
        if not new_shard and sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r} in shard {sample.shard}")
        meta = json.dumps(
            sample.meta, sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        try:
            if new_shard:
                self._finish()
                self._start(sample.shard)
            tar = self._tar
            if tar is None:  # _start opened it; this narrows the type
                raise RuntimeError("tar not open")
            for suffix, data in (
                ("jpg", sample.data),
                ("cls", str(sample.label).encode("ascii")),
                ("json", meta),
                *sorted(sample.extras.items()),
            ):
                tar.addfile(_member(f"{sample.key}.{suffix}", data), io.BytesIO(data))
        except BaseException as error:
            # a half-written tar member or shard would corrupt what follows
            self._poison(error)
            raise
        self._keys.add(sample.key)

    def _close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
        self._tar, self._file, self._shard = None, None, None
        super().abort()
