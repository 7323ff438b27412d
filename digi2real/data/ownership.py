"""What digi2real owns in an OUT, and the only way a whole output is cleared.

digi2real deletes only what it wrote. What that is follows from OUT's own records: the names
of :mod:`digi2real.data.layout` (:func:`~digi2real.data.layout.is_owned_name`), the identities
of the persisted plan (an image counts only in a planned identity's folder), and the
temporary names of :mod:`digi2real.data.fsio` beside them. Anything else in OUT is the
user's ("foreign"): a re-run leaves it alone, ``--overwrite`` refuses while it is there
unless ``delete_foreign`` is asked for, and nothing that holds an input of the run is ever
deleted. digi2real makes no symbolic links, so ``--overwrite`` takes a link for foreign and
never follows it (OUT itself may be a link: what it points to is cleared, the link stays);
finalisation's sweep of orphan images goes through a linked ``images/`` folder, deleting
only digi2real's own names there.

:func:`check_apart` refuses an OUT that overlaps the source dataset (the same folder, one
inside the other) before any work, with or without ``--overwrite``.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from digi2real.data import fsio, layout
from digi2real.data.layout import OutLayout
from digi2real.data.store import ObjectPath, location

logger = logging.getLogger(__name__)

Location = Path | ObjectPath
SHOWN = 5  # foreign paths named in a refusal or a warning


class OverlapError(ValueError):
    """OUT and an input of the run overlap: a run could overwrite or delete the input."""


class ForeignFilesError(ValueError):
    """``--overwrite`` on an OUT holding files digi2real did not write."""


@dataclass
class Survey:
    """OUT's files split by ownership (paths relative to OUT, POSIX); a symbolic link is
    listed as foreign and not followed."""

    owned: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def describe_foreign(self, limit: int = SHOWN) -> str:
        shown = ", ".join(self.foreign[:limit])
        more = len(self.foreign) - limit
        return shown + (f" and {more} more" if more > 0 else "")


def planned_identities(out: Location) -> frozenset[str] | None:
    """The identities of OUT's persisted plan (NFC); None when OUT has no complete plan."""
    paths = OutLayout(out)
    if not paths.run_json.is_file() or not paths.plan.is_file():
        return None
    from digi2real.data.manifest import read_table

    names = read_table(paths.plan, columns=["identity"]).column("identity").to_pylist()
    return frozenset(unicodedata.normalize("NFC", name) for name in names)


def is_owned(relative: str, identities: frozenset[str]) -> bool:
    """``relative`` is a file digi2real writes (or a temporary name of one) in an OUT
    planned with ``identities``."""
    folder, _, name = relative.rpartition("/")
    if fsio.is_temp_name(name):
        # a write that never committed: owned where the final name would be
        name = name[1:].rsplit(".", 3)[0]
        relative = f"{folder}/{name}" if folder else name
    return layout.is_owned_name(relative, identities)


def survey(out: Location, identities: frozenset[str] | None = None) -> Survey:
    """Every file under OUT, owned or foreign. Without a complete plan (a new OUT, or a
    planning run that was killed) only the run state is owned."""
    out = location(out)
    if identities is None:
        identities = planned_identities(out)
    result = Survey()
    for relative in _files(out):
        if identities is None:
            owned = relative.split("/", 1)[0] == layout.STATE
        else:
            owned = is_owned(relative, identities)
        (result.owned if owned else result.foreign).append(relative)
    return result


def _files(out: Location) -> Iterable[str]:
    if isinstance(out, ObjectPath):
        if out.exists():
            yield from sorted(out.listing())
        return
    if not out.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(out):
        folder = Path(dirpath)
        # a link to a folder is listed (as foreign), not entered
        links = [d for d in dirnames if (folder / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for name in sorted(filenames + links):
            yield (folder / name).relative_to(out).as_posix()


def foreign_files(out: Location, identities: frozenset[str] | None = None) -> list[str]:
    return survey(out, identities).foreign


def inside(path: Location, folder: Location) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (local paths compared after resolving
    links, URLs by protocol and key)."""
    if isinstance(path, ObjectPath) or isinstance(folder, ObjectPath):
        return isinstance(path, ObjectPath) and path.is_relative_to(folder)
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_apart(out: Location, source: Location | None, inputs: Mapping[str, Location]) -> None:
    """Refuse an OUT that is the source dataset, lies inside it or holds it (a re-run would
    read its own outputs as identities, ``--overwrite`` would delete the source), and an OUT
    that holds another input of the run (weights, statistics...): :func:`clear` would have
    to step around it, and a user who asked for a fresh OUT would not expect it there."""
    out = location(out)
    if source is not None:
        source = location(source)
        if inside(out, source) and inside(source, out):
            raise OverlapError(f"SRC and OUT are the same folder ({out}): choose a new OUT")
        if inside(source, out):
            raise OverlapError(
                f"the source dataset {source} lies inside OUT {out}: choose an OUT outside it"
            )
        if inside(out, source):
            raise OverlapError(
                f"OUT {out} lies inside the source dataset {source} (it would be read as an "
                "identity): choose an OUT outside it"
            )
    for name, path in inputs.items():
        if inside(location(path), out):
            raise OverlapError(
                f"{name} {path} lies inside OUT {out}; move it out of OUT, or choose another OUT"
            )


def clear(out: Location, *, delete_foreign: bool = False) -> int:
    """Delete what digi2real wrote in OUT (and, only with ``delete_foreign``, everything
    else in it), then the folders left empty; OUT itself stays. Refuses (ForeignFilesError)
    when foreign files are there and ``delete_foreign`` is not set, before deleting anything.
    Returns the number of files deleted."""
    out = location(out)
    found = survey(out)
    if found.foreign and not delete_foreign:
        raise ForeignFilesError(
            f"refusing to --overwrite {out}: it holds {len(found.foreign)} file(s) digi2real did "
            f"not write ({found.describe_foreign()}); move them out of OUT, or add "
            "--delete-foreign-files to delete them too"
        )
    doomed = found.owned + (found.foreign if delete_foreign else [])
    fsio.remove_files(out, doomed)
    if doomed:
        logger.info("--overwrite: deleted %d file(s) in %s", len(doomed), out)
    if not isinstance(out, ObjectPath):  # a store has no folders
        _remove_empty_folders(out, everything=delete_foreign)
    return len(doomed)


def _remove_empty_folders(out: Path, *, everything: bool) -> None:
    """The folders digi2real makes (all of them with ``everything``) that are now empty."""
    for dirpath, dirnames, _ in os.walk(out, topdown=False):
        for name in dirnames:
            folder = Path(dirpath) / name
            parts = folder.relative_to(out).parts
            ours = parts[0] == layout.STATE or (
                parts[0] in layout.OWNED_FOLDERS and len(parts) <= 2
            )
            if folder.is_symlink() or not (ours or everything):
                continue
            with suppress(OSError):  # not empty: something in it was kept
                folder.rmdir()
