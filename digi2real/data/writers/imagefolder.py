"""The ImageFolder format: ``OUT/images/<identity>/<index:04d>.jpg``, the canonical store."""

from __future__ import annotations

from pathlib import Path

from digi2real.data import fsio, layout
from digi2real.data.store import ObjectPath
from digi2real.data.writers import Sample, Writer, register_writer


@register_writer("imagefolder")
class ImageFolderWriter(Writer):
    """``out_dir/images/<identity>/<index:04d>.jpg``, one atomic file per sample.

    Identity names become folder names verbatim (NFC-normalised); a name that is not a
    usable path component is a ValueError rather than a silently renamed class.
    """

    def __init__(self, *, out_dir: str | Path | ObjectPath, fsync: bool = True) -> None:
        super().__init__(out_dir=out_dir)
        self.fsync = fsync
        self.count = 0

    @staticmethod
    def relative_path(identity: str, index: int) -> str:
        """The image's path relative to ``out_dir`` (POSIX separators, as in the manifest)."""
        return layout.image_path(fsio.safe_component(identity), index)

    def path_for(self, identity: str, index: int) -> Path | ObjectPath:
        return fsio.safe_join(self.out_dir, *self.relative_path(identity, index).split("/"))

    def write(self, sample: Sample) -> None:
        self._check_open()
        fsio.atomic_write_bytes(
            self.path_for(sample.identity, sample.index), sample.data, fsync=self.fsync
        )
        self.count += 1

    def _close(self) -> None:
        """Nothing pending: each image was committed as it was written."""
