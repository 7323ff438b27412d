"""Where a dataset lives: a local path or an object-store URL, decided once from its name.

:func:`location` turns what the user typed into a :class:`pathlib.Path` (a local path or a
``file://`` URL) or an :class:`ObjectPath` (``s3://``, ``gs://``, any other fsspec protocol).
An ``ObjectPath`` answers the part of ``pathlib``'s interface the project reads through
(``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``iterdir``, ``read_bytes``, ``open``),
so code that reads OUT or SRC works on either; :mod:`digi2real.data.fsio` writes to both (on a
store: one PUT per object under its final name, no temporary name, no rename).

Credentials and endpoints come only from the standard environment: the ``AWS_*`` variables
(``AWS_ENDPOINT_URL`` for MinIO, Ceph or any S3-compatible store), fsspec's own config
(``FSSPEC_*`` variables, ``~/.config/fsspec``), Google's application default credentials. A URL
holding credentials (``s3://KEY:SECRET@bucket``) is refused, and :func:`redact` keeps the
credential variables' values out of every log line.

Reads are retried by the clients themselves (botocore's retry modes on S3: throttling,
5xx and dropped connections, ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``; s3fs's own loop
for ``SlowDown`` and timeouts); what is left is an error of the request it belonged to.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")
LOCAL_PROTOCOLS = ("file", "local")
# environment variables whose values are secrets: never in a file or a log line
CREDENTIAL_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
# per protocol: fsspec options that correctness needs. Listings are never cached: another
# process (a rank, an actor) commits shards this one must see on its next look.
_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False},
    "gs": {"use_listings_cache": False},
    "gcs": {"use_listings_cache": False},
}


class StorageAccessError(ValueError):
    """A dataset location that cannot be used as asked: unreachable, missing bucket, no
    permission, expired credentials (a ValueError: the command, not the run, must change)."""


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def location(spec: str | os.PathLike[str] | ObjectPath) -> Path | ObjectPath:
    """A local ``Path`` or an :class:`ObjectPath`, from a path, a URL or either of those."""
    if isinstance(spec, ObjectPath | Path):
        return spec
    text = os.fspath(spec)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    protocol, rest = match["protocol"].lower(), match["rest"]
    if protocol in LOCAL_PROTOCOLS:
        return Path(rest)
    bucket = rest.split("/", 1)[0]
    if "@" in bucket:
        raise StorageAccessError(
            f"{protocol}://...@{bucket.rpartition('@')[2]}: credentials do not belong in a URL "
            "(they would end up in config.yaml); set them in the environment (AWS_* variables, "
            "fsspec config, application default credentials)"
        )
    key = rest.strip("/")
    if not key:
        raise StorageAccessError(f"{text!r} names no bucket")
    return ObjectPath(protocol, key)


def is_remote(path: object) -> bool:
    return isinstance(path, ObjectPath)


def _options(protocol: str) -> dict[str, Any]:
    options = dict(_OPTIONS.get(protocol, {}))
    if protocol == "s3" and not (
        os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")
    ):
        # a long run meets throttling, 5xx and dropped connections: botocore's standard mode
        # retries them with jittered exponential backoff; the user's AWS_* settings win
        options["config_kwargs"] = {"retries": {"mode": "standard", "max_attempts": 10}}
    return options


def filesystem(protocol: str) -> Any:
    """The fsspec file system of ``protocol`` (one instance per process, fsspec's cache)."""
    try:
        import fsspec
    except ImportError as error:  # pragma: no cover - fsspec comes with torch and the hub
        raise StorageAccessError(f"{protocol}:// needs fsspec ({error})") from error
    try:
        return fsspec.filesystem(protocol, **_options(protocol))
    except ImportError as error:
        extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
        install = f"pip install 'digi2real[{extra}]'" if extra else "install its fsspec backend"
        raise StorageAccessError(
            f"{protocol}:// URLs need a library that is not installed ({error}); {install}"
        ) from error
    except ValueError as error:
        raise StorageAccessError(f"unknown storage protocol {protocol}:// ({error})") from error


@dataclass(frozen=True, order=True)
class ObjectPath:
    """An object (or a prefix of objects) in a store: ``protocol://bucket/key``.

    Only strings: it pickles to workers and Ray actors, which open their own file system.
    """

    protocol: str
    key: str  # "bucket/a/b", no leading or trailing "/"

    # -- names ------------------------------------------------------------------------------

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __truediv__(self, part: str | os.PathLike[str]) -> ObjectPath:
        text = os.fspath(part).strip("/")
        return ObjectPath(self.protocol, f"{self.key}/{text}") if text else self

    def joinpath(self, *parts: str) -> ObjectPath:
        path = self
        for part in parts:
            path = path / part
        return path

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> ObjectPath:
        head = self.key.rpartition("/")[0]
        return ObjectPath(self.protocol, head) if head else self

    @property
    def parents(self) -> list[ObjectPath]:
        found, path = [], self
        while path.parent != path:
            path = path.parent
            found.append(path)
        return found

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.with_name(self.stem + suffix)

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self.key[len(other.key) :].lstrip("/"))

    def is_relative_to(self, other: object) -> bool:
        return (
            isinstance(other, ObjectPath)
            and other.protocol == self.protocol
            and (self.key == other.key or self.key.startswith(other.key + "/"))
        )

    def is_absolute(self) -> bool:
        return True

    def resolve(self, strict: bool = False) -> ObjectPath:
        return self  # a store has no symlinks and no relative names

    def as_posix(self) -> str:
        return str(self)

    # -- reading ----------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        return filesystem(self.protocol)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.key))

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[ObjectPath]:
        for name in sorted(self.fs.ls(self.key, detail=False)):
            child = name.strip("/")
            if child != self.key:
                yield ObjectPath(self.protocol, child)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Children whose name matches ``pattern`` (one level, like ``Path.glob("*.png")``)."""
        import fnmatch

        if "/" in pattern:
            raise ValueError(f"{self}: glob of one level only, got {pattern!r}")
        if self.exists():
            yield from (child for child in self.iterdir() if fnmatch.fnmatch(child.name, pattern))

    def files(self) -> list[ObjectPath]:
        """Every object under this prefix, at any depth, sorted (one recursive listing)."""
        return [ObjectPath(self.protocol, n.strip("/")) for n in sorted(self.fs.find(self.key))]

    def listing(self) -> dict[str, dict[str, Any]]:
        """Every object under this prefix with its size and (where the store has one) ETag,
        keyed by its path relative to the prefix: one recursive listing."""
        prefix = self.key + "/"
        found = {
            name.strip("/"): info for name, info in self.fs.find(self.key, detail=True).items()
        }
        return {
            name[len(prefix) :]: info for name, info in found.items() if name.startswith(prefix)
        }

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.key))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb", encoding: str | None = None) -> Any:
        if mode not in ("r", "rb"):
            raise ValueError(f"{self}: open for reading only; writes go through data.fsio")
        handle: BinaryIO = self.fs.open(self.key, "rb")
        if mode == "r":
            import io

            return io.TextIOWrapper(handle, encoding=encoding or "utf-8")
        return handle

    def size(self) -> int:
        return int(self.fs.size(self.key))


@dataclass(frozen=True)
class ObjectEntry:
    """What ``os.scandir`` yields, for a name in an object-store listing."""

    name: str
    path: ObjectPath
    folder: bool

    def is_dir(self) -> bool:
        return self.folder

    def is_file(self) -> bool:
        return not self.folder

    def is_symlink(self) -> bool:
        return False


def object_scandir(root: ObjectPath) -> Callable[[ObjectPath], Any]:
    """``os.scandir`` over a snapshot of every key under ``root`` (one recursive listing)."""
    children: dict[str, dict[str, bool]] = {}
    for rel in root.listing():
        parts = [part for part in rel.split("/") if part]
        for depth, name in enumerate(parts):
            folder = "/".join(parts[:depth])
            is_dir = depth < len(parts) - 1
            children.setdefault(folder, {})[name] = children.get(folder, {}).get(name, is_dir)

    @contextmanager
    def scandir(path: ObjectPath) -> Iterator[list[ObjectEntry]]:
        folder = str(path.relative_to(root)) if path != root else ""
        folder = "" if folder == "." else folder
        entries = children.get(folder)
        if entries is None:
            raise FileNotFoundError(f"no such folder: {path}")
        yield [ObjectEntry(name, path / name, is_dir) for name, is_dir in entries.items()]

    return scandir


def entry_path(entry: Any) -> Path | ObjectPath:
    """The path of an ``os.scandir`` entry or of an :class:`ObjectEntry`."""
    return entry.path if isinstance(entry, ObjectEntry) else Path(entry.path)


def files_under(folder: Path | ObjectPath) -> Iterator[tuple[str, Path | ObjectPath]]:
    """(path relative to ``folder`` in POSIX form, path) of every file at any depth below
    ``folder``; nothing when it does not exist. One recursive listing on a store."""
    if isinstance(folder, ObjectPath):
        if folder.exists():
            for rel in sorted(folder.listing()):
                yield rel, folder / rel
        return
    if not folder.is_dir():
        return
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            yield path.relative_to(folder).as_posix(), path


def read_many(paths: list[ObjectPath]) -> dict[ObjectPath, bytes | Exception]:
    """The bytes of each object, fetched concurrently (the client's own pool); a missing or
    unreadable object maps to its exception."""
    if not paths:
        return {}
    by_key = {path.key: path for path in paths}
    fetched = paths[0].fs.cat([path.key for path in paths], on_error="return")
    if not isinstance(fetched, dict):  # one path: fsspec returns its bytes
        fetched = {paths[0].key: fetched}
    return {by_key[key.strip("/")]: value for key, value in fetched.items()}


def describe_error(error: BaseException) -> str:
    """One line for a storage error (the client's exception chain can be several screens)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"


def check_bucket(path: Path | ObjectPath, what: str) -> None:
    """Stop with a one-line :class:`StorageAccessError` when the bucket of ``path`` cannot be
    used: unreachable endpoint, missing bucket, no permission, expired credentials. A local
    path is left to the caller's own checks."""
    if not isinstance(path, ObjectPath):
        return
    bucket, _, prefix = path.key.partition("/")
    try:
        fs = path.fs
        if hasattr(fs, "call_s3"):
            # a LIST, not a HEAD: a HEAD's error has no body, so an expired token or a
            # denial would read as a bare "400 Bad Request"
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        else:
            fs.info(bucket)
    except StorageAccessError:
        raise
    except Exception as error:  # noqa: BLE001 - endpoint errors come in many client types
        raise access_error(path, what, error) from None


def check_readable(path: Path | ObjectPath, what: str) -> None:
    """:func:`check_bucket`, then ``path`` must exist."""
    if not isinstance(path, ObjectPath):
        return
    check_bucket(path, what)
    try:
        found = path.exists()
    except Exception as error:  # noqa: BLE001
        raise access_error(path, what, error) from None
    if not found:
        raise StorageAccessError(f"{what} not found: {path}")


def access_error(path: Path | ObjectPath, what: str, error: BaseException) -> StorageAccessError:
    """The one-line error for ``error`` raised while probing ``path``."""
    if isinstance(error, PermissionError) or getattr(error, "errno", None) == errno.EACCES:
        reason = "access denied or credentials expired"
    elif isinstance(error, FileNotFoundError):
        reason = "bucket not found"
    else:
        reason = "store unreachable"
    return StorageAccessError(f"{what} {path}: {reason} ({describe_error(error)})")


class RedactCredentials(logging.Filter):
    """Replaces the values of :data:`CREDENTIAL_VARIABLES` in every record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = [
            value for name in CREDENTIAL_VARIABLES if len(value := os.environ.get(name, "")) >= 8
        ]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact_logs() -> None:
    """Keep credential values out of every log handler this process has (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactCredentials) for f in handler.filters):
            handler.addFilter(RedactCredentials())
