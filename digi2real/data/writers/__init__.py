"""Output formats behind one interface, chosen by name.

A :class:`Writer` takes :class:`Sample` objects one at a time and publishes files only when
they are complete (through :mod:`digi2real.data.fsio`); :meth:`Writer.close` writes any
index last. Used as a context manager, an exception discards the files in flight and keeps
the ones already committed.

Formats: ``imagefolder``, ``webdataset`` and ``recordio``, one module each in this package,
which register themselves in :data:`WRITERS`; :mod:`.assemble` builds the formats that need
global labels from the committed images.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from digi2real.data.store import ObjectPath, location

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One accepted output image.

    ``key`` is the WebDataset key (:func:`sample_key`), ``label`` the contiguous class id,
    ``index`` the image's number within its identity, ``shard`` the plan shard it came
    from, ``data`` the encoded JPEG and ``meta`` anything JSON-serialisable.
    """

    key: str
    label: int
    identity: str
    index: int
    shard: int
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, bytes] = field(default_factory=dict)


def sample_key(label: int, index: int) -> str:
    """The WebDataset key of image ``index`` of class ``label``: fixed width, so keys sort
    like (label, index), and no dots, because WebDataset splits the key at the first dot."""
    if label < 0 or index < 0:
        raise ValueError(f"sample_key needs label >= 0 and index >= 0, got ({label}, {index})")
    return f"{label:07d}_{index:04d}"


class Writer(ABC):
    """Base of the output formats: ``write(sample)`` repeatedly, then ``close()``."""

    name: ClassVar[str]

    def __init__(self, *, out_dir: str | Path | ObjectPath) -> None:
        self.out_dir: Any = location(out_dir)
        self.closed = False
        self._failed: BaseException | None = None

    @abstractmethod
    def write(self, sample: Sample) -> None:
        """Add one sample."""

    def close(self) -> None:
        """Publish what is still pending, a format's index last; on failure, :meth:`abort`."""
        if self.closed:
            return
        self._check_open()
        try:
            self._close()
        except BaseException:
            self.abort()
            raise
        self.closed = True

    @abstractmethod
    def _close(self) -> None:
        """The format's own publishing step, called once by :meth:`close`."""

    def abort(self) -> None:
        """Discard temporary files; committed files stay. Never raises."""
        self.closed = True

    def _check_open(self) -> None:
        if self._failed is not None:
            raise ValueError(
                f"{type(self).__name__} for {self.out_dir} had a failed write "
                f"({self._failed}); it can only be aborted"
            )
        if self.closed:
            raise ValueError(f"{type(self).__name__} for {self.out_dir} is closed")

    def _poison(self, error: BaseException) -> None:
        """Refuse further writes: a half-written record would corrupt what follows."""
        self._failed = error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


WRITERS: dict[str, type[Writer]] = {}
_BUILTIN_MODULES = (
    "digi2real.data.writers.imagefolder",
    "digi2real.data.writers.webdataset",
    "digi2real.data.writers.recordio",
)

W = TypeVar("W", bound=type[Writer])


def register_writer(name: str) -> Callable[[W], W]:
    """Class decorator adding a :class:`Writer` to :data:`WRITERS` under ``name``."""

    def decorate(cls: W) -> W:
        if WRITERS.get(name, cls) is not cls:
            raise ValueError(f"writer name {name!r} already taken by {WRITERS[name].__name__}")
        cls.name = name
        WRITERS[name] = cls
        return cls

    return decorate


def get_writer(name: str, out_dir: str | Path | ObjectPath, **kwargs: Any) -> Writer:
    """A new writer of format ``name`` (one of :data:`WRITERS`) rooted at ``out_dir``."""
    try:
        cls = WRITERS[name]
    except KeyError:
        raise ValueError(
            f"unknown output format {name!r}; valid choices: {sorted(WRITERS)}"
        ) from None
    return cls(out_dir=out_dir, **kwargs)


def _load_builtin_writers() -> None:
    # imported here, not at the top: those modules subclass Writer from this one
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


_load_builtin_writers()
