"""Every byte of output the project writes goes through this module.

On a local file system, files are written under a temporary name unique to the attempt
(same folder, so the rename cannot cross file systems), flushed, fsynced and renamed over the
final name: a reader sees the old file or the new one, never half of one, and a crash leaves
at most a hidden ``.<name>.<pid>.<random>.tmp`` behind.

On an object store (:class:`~digi2real.data.store.ObjectPath`), each object is PUT under its
final name: a PUT, or a multipart upload completed at close, is published whole or not at
all, so there is no temporary name, no rename and nothing stale to sweep. A write that fails
is aborted (its multipart parts dropped); nothing half-written becomes visible.

Tests inject write failures by monkeypatching :func:`_write_all` (every data write, streamed
objects included), :func:`_open_exclusive` (every local file creation) or :func:`_put` (every
whole-object PUT); tests run as root, where permissions cannot make a write fail.
``ENOSPC``/``EDQUOT``/``EROFS`` and a denied write (``EACCES``, a store's AccessDenied or
expired credentials) come out as :class:`OutputWriteError` naming the file the user asked
for, not the temporary one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from digi2real.data.store import (
    ObjectPath,
    StorageAccessError,
    access_error,
    check_bucket,
    location,
)

logger = logging.getLogger(__name__)

MAX_COMPONENT_BYTES = 255
_MESSAGES = {
    errno.ENOSPC: "disk full while writing {path}",
    errno.EDQUOT: "disk quota exceeded while writing {path}",
    errno.EROFS: "output is read-only: {path}",
    errno.EACCES: "permission denied writing {path}",
}
Location = Path | ObjectPath
_FORBIDDEN_CHARS = {"/": "'/'", "\\": "'\\\\'", "\0": "NUL"}


class OutputWriteError(OSError):
    """The output location cannot take more bytes (full, over quota or read-only)."""

    def __init__(self, code: int, message: str, filename: str | None = None) -> None:
        super().__init__(code, message)
        self.filename = filename

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles only (errno, strerror); Ray and multiprocessing ship errors by pickle
        return (type(self), (self.errno, self.strerror, self.filename))


@contextmanager
def _translated(path: Location) -> Iterator[None]:
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as error:
        code = error.errno
        if isinstance(error, PermissionError) and code is None:
            code = errno.EACCES  # a store's AccessDenied / ExpiredToken carries no errno
        message = _MESSAGES.get(code) if code is not None else None
        if message is None:
            raise
        raise OutputWriteError(code, message.format(path=path), str(path)) from error


def _write_all(fileobj: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """The one function that hands data to the operating system."""
    view = memoryview(data).cast("B")
    while view:
        written = fileobj.write(view)
        if written is None:  # a non-blocking raw file that took nothing; never a local file
            raise BlockingIOError(errno.EAGAIN, "write would block")
        view = view[written:]


def _open_exclusive(path: Path) -> int:
    """The one function that creates output files (never follows or reuses an existing name)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; some file systems refuse fsync on a directory
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _put(path: ObjectPath, data: bytes, *, exclusive: bool = False) -> None:
    """The one function that PUTs a whole object (``exclusive``: only if none has its name;
    FileExistsError otherwise). The client uploads large data in parts, published whole."""
    path.fs.pipe_file(path.key, data, mode="create" if exclusive else "overwrite")


def _as_location(path: str | os.PathLike[str] | ObjectPath) -> Location:
    return location(path)


def make_dirs(path: str | os.PathLike[str] | ObjectPath) -> Location:
    """``mkdir -p`` with the output-error translation (a store has no folders to make)."""
    path = _as_location(path)
    if isinstance(path, ObjectPath):
        return path
    with _translated(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def remove(path: str | os.PathLike[str] | ObjectPath) -> None:
    """Delete a file if it exists, with the output-error translation."""
    path = _as_location(path)
    with _translated(path):
        if isinstance(path, ObjectPath):
            with suppress(FileNotFoundError):
                path.fs.rm_file(path.key)
        else:
            path.unlink(missing_ok=True)


def remove_files(root: str | os.PathLike[str] | ObjectPath, relatives: list[str]) -> None:
    """Delete the files at ``relatives`` (POSIX, below ``root``) that exist; on a store in
    batched DELETE requests, not one per object."""
    root = _as_location(root)
    if isinstance(root, ObjectPath):
        keys = [(root / relative).key for relative in relatives]
        with _translated(root):
            for start in range(0, len(keys), 1000):  # S3's DeleteObjects takes 1000 keys
                with suppress(FileNotFoundError):
                    root.fs.rm(keys[start : start + 1000])
        return
    for relative in relatives:
        remove(root / relative)


def remove_tree(path: str | os.PathLike[str] | ObjectPath) -> None:
    """Delete a folder (every object under a prefix) and what it holds, if it exists."""
    path = _as_location(path)
    with _translated(path):
        if isinstance(path, ObjectPath):
            keys = [child.key for child in path.files()] if path.exists() else []
            if keys:
                path.fs.rm(keys)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def temp_name(path: Path) -> Path:
    """A sibling name unique to this attempt: pid for a human reading the folder, random bits
    because pids repeat across machines sharing a file system and across restarts."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a :func:`temp_name` (a write that was never committed)."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temps(
    directory: str | os.PathLike[str] | ObjectPath,
    *,
    recursive: bool = False,
) -> int:
    """Delete uncommitted temp files in ``directory`` (and below it when ``recursive``); only
    safe when nothing else writes there (a shard's folder at the start of its attempt, OUT's
    own folders during finalisation)."""
    if isinstance(directory, ObjectPath):
        return 0  # objects are PUT under their final names: no temporary ones exist
    directory = Path(directory)
    removed = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        if not recursive:
            dirnames[:] = []
        for name in filenames:
            path = Path(dirpath) / name
            if is_temp_name(name) and not path.is_symlink():
                logger.info("removing stale temporary file %s", path)
                path.unlink()
                removed += 1
    return removed


class AtomicFile:
    """A binary file written under a temporary name and published by :meth:`commit`.

    Use :func:`atomic_open` for one file; use this class directly to publish several files
    in a chosen order (:meth:`sync` them all, then :meth:`commit` one by one).
    """

    def __new__(cls, path: str | os.PathLike[str] | ObjectPath, *, fsync: bool = True) -> Any:
        if cls is AtomicFile and isinstance(location(path), ObjectPath):
            return super().__new__(ObjectFile)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path: Any = Path(path)
        self.fsync = fsync
        make_dirs(self.path.parent)
        self.temp_path = temp_name(self.path)
        with _translated(self.path):
            fd = _open_exclusive(self.temp_path)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self.committed = False

    @property
    def closed(self) -> bool:
        return self._file is None

    def _require_open(self) -> BinaryIO:
        if self._file is None:
            raise ValueError(f"{self.path}: write after sync/commit/discard")
        return self._file

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fileobj = self._require_open()
        with _translated(self.path):
            _write_all(fileobj, data)
        return len(memoryview(data).cast("B"))

    def tell(self) -> int:
        return self._require_open().tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._require_open().seek(offset, whence)

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        with _translated(self.path):
            self._require_open().flush()

    def sync(self) -> None:
        """Flush, fsync and close the temporary file (idempotent)."""
        if self._file is None:
            return
        fileobj, self._file = self._file, None
        try:
            with _translated(self.path):
                fileobj.flush()
                if self.fsync:
                    os.fsync(fileobj.fileno())
        except BaseException:
            # close() would retry the failed flush and mask the translated error
            with suppress(OSError):
                fileobj.close()
            raise
        with _translated(self.path):
            fileobj.close()

    def commit(self) -> Any:
        """Rename the finished temporary file over :attr:`path`."""
        if self.committed:
            return self.path
        self.sync()
        with _translated(self.path):
            os.replace(self.temp_path, self.path)
        self.committed = True
        if self.fsync:
            _fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Drop the temporary file; a committed file stays. Never raises."""
        if self._file is not None:
            fileobj, self._file = self._file, None
            # ENOSPC can surface again when closing the buffer we are throwing away
            with suppress(OSError):
                fileobj.close()
        if not self.committed:
            try:
                self.temp_path.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                logger.warning("could not remove temporary file %s: %s", self.temp_path, error)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


class ObjectFile(AtomicFile):
    """An :class:`AtomicFile` on an object store: the bytes stream to the object's final name
    (the client's buffered upload, in parts once large) and :meth:`commit` completes it, which
    publishes the whole object at once; :meth:`discard` aborts the upload. Written front to
    back: no seek."""

    def __init__(self, path: ObjectPath | str, *, fsync: bool = True) -> None:
        path = location(path)
        if not isinstance(path, ObjectPath):
            raise ValueError(f"{path} is not on an object store: use AtomicFile")
        self.path = path
        self.fsync = fsync
        self.temp_path = None
        with _translated(path):
            self._file = path.fs.open(path.key, "wb")
        self.committed = False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        import io

        raise io.UnsupportedOperation(f"{self.path}: an object is written front to back")

    def seekable(self) -> bool:
        return False

    def sync(self) -> None:
        """Nothing to do before the commit: the upload completes there."""
        self._require_open()

    def commit(self) -> ObjectPath:
        if self.committed:
            return self.path
        fileobj = self._require_open()
        try:
            with _translated(self.path):
                fileobj.close()
        except BaseException:
            self.discard()
            raise
        self._file = None
        self.committed = True
        return self.path

    def discard(self) -> None:
        if self._file is None or self.committed:
            return
        fileobj, self._file = self._file, None
        try:
            discard = getattr(fileobj, "discard", None)
            if discard is not None:
                discard()  # aborts a started multipart upload: its parts are never published
            with suppress(AttributeError):  # a BytesIO-based file: dropping it is enough
                fileobj.closed = True  # closing now would publish what was written
        except Exception as error:  # noqa: BLE001 - an abandoned upload expires on its own
            logger.warning("could not abort the upload of %s: %s", self.path, error)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = True
) -> Iterator[AtomicFile]:
    """Write ``path`` atomically: committed on a clean exit, discarded on an exception."""
    if mode != "wb":
        raise ValueError(f"atomic_open supports mode 'wb' only, got {mode!r}")
    with AtomicFile(path, fsync=fsync) as handle:
        yield handle


def atomic_write_bytes(
    path: str | os.PathLike[str] | ObjectPath, data: bytes, *, fsync: bool = True
) -> Location:
    """Replace ``path`` with ``data`` atomically (parent folders are created); on a store,
    one PUT."""
    path = location(path)
    if isinstance(path, ObjectPath):
        with _translated(path):
            _put(path, data)
        return path
    with atomic_open(path, fsync=fsync) as handle:
        handle.write(data)
    return Path(path)


def create_exclusive(path: str | os.PathLike[str] | ObjectPath, data: bytes = b"") -> bool:
    """Create ``path`` holding ``data`` if no file has that name (atomic across processes and
    machines sharing the file system or the store: one creator wins, on a store by a
    conditional PUT); False when it existed already."""
    path = _as_location(path)
    if isinstance(path, ObjectPath):
        try:
            with _translated(path):
                _put(path, data, exclusive=True)
        except FileExistsError:
            return False
        return True
    make_dirs(path.parent)
    try:
        with _translated(path):
            fd = _open_exclusive(path)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle, _translated(path):
        _write_all(handle, data)
    return True


def is_writable(directory: str | os.PathLike[str] | ObjectPath) -> bool:
    """Whether a file can be created in ``directory`` (tried with a temp name, removed)."""
    try:
        check_writable(_as_location(directory), "output")
    except (OSError, StorageAccessError):
        return False
    return True


def check_writable(path: Location, what: str, *, probe_folder: Location | None = None) -> None:
    """On a store, stop before any work with a one-line :class:`StorageAccessError` when an
    object cannot be created under ``path`` (unreachable endpoint, missing bucket, denied
    write, expired credentials): a probe object is PUT and deleted (in ``probe_folder``,
    default ``path``). On a local file system a probe file is created and removed in the
    nearest existing folder."""
    if isinstance(path, ObjectPath):
        check_bucket(path, what)
        folder = probe_folder if isinstance(probe_folder, ObjectPath) else path
        probe = folder / f".write-probe.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            _put(probe, b"")
            probe.fs.rm_file(probe.key)
        except Exception as error:  # noqa: BLE001 - client errors come in many types
            raise access_error(path, f"{what} (writing)", error) from None
        return
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    probe = temp_name(folder / "write-probe")
    os.close(_open_exclusive(probe))
    probe.unlink()


def copy_file(
    source: str | os.PathLike[str] | ObjectPath,
    target: str | os.PathLike[str] | ObjectPath,
    *,
    link: bool = False,
) -> Location:
    """``target`` with ``source``'s bytes: a hard link when ``link`` and the file system allows
    (the same file, no bytes written), else an atomic copy."""
    target = _as_location(target)
    source = _as_location(source)
    if isinstance(target, ObjectPath) or isinstance(source, ObjectPath):
        return atomic_write_bytes(target, source.read_bytes())
    if link:
        make_dirs(target.parent)
        try:
            os.link(source, target)
            return target
        except OSError:
            pass  # another file system, or no hard links there: copy
    with open(source, "rb") as reader, atomic_open(target) as writer:
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
    return target


@contextmanager
def exclusive(directory: Location) -> Iterator[None]:
    """Hold ``directory`` against other processes doing the same (finalisation by several
    ranks on a shared file system: one sweeps stale temporary files while no other is
    writing). A lock on the folder itself, released by the kernel if the holder dies; where
    the file system has no such locks, and on a store (no temporary files, same bytes from
    every writer), it holds nothing."""
    if isinstance(directory, ObjectPath):
        yield
        return
    import fcntl

    make_dirs(directory)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            logger.debug("no lock on %s (%s): finalising unlocked", directory, error)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename a complete file (on the same file system, e.g. a download staged in the target
    dir) over ``target``; parent folders are created."""
    target = Path(target)
    make_dirs(target.parent)
    with _translated(target):
        os.replace(source, target)
    _fsync_dir(target.parent)
    return target


def safe_component(name: str) -> str:
    """``name`` NFC-normalised, if it is usable as one path component on any common system.

    Spaces and non-ASCII letters are fine; separators, NUL, control characters, ``.``/``..``
    and names over 255 bytes of UTF-8 are refused (ValueError).
    """
    if not isinstance(name, str):
        raise ValueError(f"path component must be a str, got {type(name).__name__}")
    normal = unicodedata.normalize("NFC", name)
    if normal in ("", ".", ".."):
        raise ValueError(f"unusable path component {name!r}: empty, '.' or '..'")
    for char, label in _FORBIDDEN_CHARS.items():
        if char in normal:
            raise ValueError(f"unusable path component {name!r}: contains {label}")
    if any(unicodedata.category(char) == "Cc" for char in normal):
        raise ValueError(f"unusable path component {name!r}: contains a control character")
    size = len(normal.encode("utf-8"))
    if size > MAX_COMPONENT_BYTES:
        raise ValueError(
            f"unusable path component {name[:40]!r}...: {size} bytes of UTF-8, "
            f"the limit is {MAX_COMPONENT_BYTES}"
        )
    return normal


def safe_join(root: str | os.PathLike[str] | ObjectPath, *parts: str) -> Location:
    """``root / part / ...`` where each part is one :func:`safe_component`, refusing a result
    that resolves outside ``root`` (e.g. through a symlink planted inside it)."""
    root = _as_location(root)
    path = root.joinpath(*(safe_component(part) for part in parts))
    if isinstance(path, ObjectPath):
        return path  # a store has no symlinks, and no part is "." or ".."
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise ValueError(f"{path} resolves outside {root} (a symlink?)")
    return path
