"""A per-node cache of what a run reads from an object store: the source images of a remote
SRC, a weights folder given as a URL.

A shard reads its source renders more than once (embedding, then the init images of
render-guided generation; again when the shard is retried or the run resumed), and every
worker on a node loads the same weights: each object is fetched once per node into
``$DIGI2REAL_CACHE`` (default ``$DIGI2REAL_HOME/remote``, ``DIGI2REAL_HOME`` defaulting to
``~/.cache/digi2real`` as for the weights),
under a name derived from its URL, size and ETag, so a changed object is fetched again and
never mistaken for its old bytes. Files land there atomically (:mod:`digi2real.data.fsio`):
processes of one node sharing the cache at most fetch an object twice, never see half of one.
The cache is never read for anything but these copies: delete it at will.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digi2real.data import fsio
from digi2real.data.store import ObjectPath, location, read_many

logger = logging.getLogger(__name__)

CACHE_ENV = "DIGI2REAL_CACHE"


def cache_root() -> Path:
    """This node's cache folder (not created)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("DIGI2REAL_HOME", Path.home() / ".cache" / "digi2real")) / "remote"


def _version(info: dict[str, Any]) -> str:
    """What tells one version of an object from another, from its listing entry."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def _cached_name(path: ObjectPath, info: dict[str, Any]) -> str:
    digest = hashlib.blake2b(
        f"{path}\0{info.get('size')}\0{_version(info)}".encode(), digest_size=16
    ).hexdigest()
    return digest + path.suffix.lower()


def local_file(path: str | Path | ObjectPath, folder: str = "objects") -> Path:
    """:func:`local_files` of one path or URL."""
    return local_files([location(path)], folder)[0]


def local_files(paths: Sequence[Path | ObjectPath], folder: str = "objects") -> list[Path]:
    """A local path for each of ``paths``, in order: a local path as it is; an object's copy
    in this node's cache, fetched (concurrently, per folder of the store) unless already
    there. A missing object maps to a cache path that does not exist, so the reader reports
    it as it would a missing local file."""
    result: list[Path | None] = [p if isinstance(p, Path) else None for p in paths]
    remote = [(i, p) for i, p in enumerate(paths) if isinstance(p, ObjectPath)]
    if not remote:
        return [Path(p) for p in result]  # type: ignore[arg-type]
    root = cache_root() / folder
    by_parent: dict[ObjectPath, list[tuple[int, ObjectPath]]] = {}
    for index, path in remote:
        by_parent.setdefault(path.parent, []).append((index, path))
    for parent, members in by_parent.items():
        listing = {parent / rel: info for rel, info in parent.listing().items()}
        missing: list[tuple[ObjectPath, Path]] = []
        for index, path in members:
            info = listing.get(path)
            if info is None:
                result[index] = root / "missing" / _cached_name(path, {})
                continue
            local = root / _cached_name(path, info)
            result[index] = local
            if not local.is_file():
                missing.append((path, local))
        if missing:
            fetched = read_many([path for path, _ in missing])
            for path, local in missing:
                data = fetched[path]
                if isinstance(data, FileNotFoundError):
                    continue  # removed since the listing: reported as missing by the reader
                if isinstance(data, Exception):
                    raise data
                fsio.atomic_write_bytes(local, data, fsync=False)
            logger.debug("fetched %d object(s) of %s into %s", len(missing), parent, root)
    return [Path(p) for p in result]  # type: ignore[arg-type]


def local_folder(url: ObjectPath, folder: str = "folders") -> Path:
    """A local copy of every object under ``url`` (a weights folder given as a URL): the same
    relative names under a cache folder of its own, fetched once per node; objects changed
    since (size, ETag) are fetched again."""
    listing = url.listing()
    if not listing:
        raise FileNotFoundError(f"nothing under {url}")
    target = cache_root() / folder / hashlib.blake2b(str(url).encode(), digest_size=16).hexdigest()
    stamps = target / ".versions"
    known: dict[str, str] = {}
    if stamps.is_file():
        for line in stamps.read_text(encoding="utf-8").splitlines():
            rel, _, version = line.partition("\t")
            known[rel] = version
    wanted = {rel: f"{info.get('size')}:{_version(info)}" for rel, info in listing.items()}
    stale = [rel for rel, version in wanted.items() if known.get(rel) != version]
    if stale:
        fetched = read_many([url / rel for rel in stale])
        for rel in stale:
            data = fetched[url / rel]
            if isinstance(data, Exception):
                raise data
            fsio.atomic_write_bytes(target / rel, data)
        text = "".join(f"{rel}\t{version}\n" for rel, version in sorted(wanted.items()))
        fsio.atomic_write_bytes(stamps, text.encode("utf-8"))
        logger.info("fetched %d file(s) of %s into %s", len(stale), url, target)
    return target
