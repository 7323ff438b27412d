"""Scan an identity dataset: one folder per identity holding image files.

Both supported layouts look the same on disk; they differ in what downstream does:

- ``digiface`` (DigiFace-1M): ``<identity>/<n>.png``, 112x112 renders already aligned to the
  ArcFace template, so face detection is skipped;
- ``imagefolder``: any sizes, faces detected and aligned downstream.

Rules, each either an ``ErrorRow`` (stage ``"scan"``) and a skip, or a clear exception —
never a crash of the whole scan, never a path outside ``root``:

- Identities are the NFC-normalised folder names, sorted in Python's default ``str`` order
  (as torchvision ``ImageFolder`` does): ``"10"`` sorts before ``"2"``. Files inside an
  identity are sorted naturally (``2.png`` before ``10.png``), ties broken by the raw name.
- Only files whose extension (case-insensitive) is in ``extensions`` are images; other files
  are ignored silently. An image-extension file that later fails to decode is an error row
  written by the caller (``error_row_for``).
- Hidden entries (leading ``.``) and OS litter folders (``IGNORED_NAMES``) are ignored.
- Names (identity folders and files) with control characters, backslashes (a path
  separator elsewhere), bytes that are not UTF-8, or only whitespace are skipped with a
  row. Spaces and any other Unicode are kept.
- Folder names that become equal after NFC normalisation are all skipped (they would share
  one output folder, label and seed stream, and neither is "the" identity). With
  ``case_insensitive=True`` names equal after ``str.casefold`` are treated the same way,
  for outputs written to case-insensitive file systems (macOS, Windows); by default they
  are distinct identities, as on Linux and in torchvision.
- Symlinks are followed when they resolve inside ``root`` (a resolved root); one that
  resolves outside, dangles, or loops is skipped with a row.
- Identity folders are not searched recursively: a nested folder is a row, not images.
- Image files directly in ``root`` are rows (``identity`` empty); other root files (README,
  licence) are ignored.
- An identity folder with no image file is a row. The "too few usable images" rule needs
  decoding, so the caller applies it with ``apply_min_images``.

Error rows carry ``path`` relative to ``root`` in POSIX form (never an absolute path of
this machine), with undecodable bytes shown as ``\\xNN``.

Speed: one ``os.scandir`` of the root, then one per *selected* identity folder; entry types
come from the directory listing, so plain files cost no ``stat``. Symlinks cost one
``resolve`` each. A root on an object store (``s3://...``) is listed once, recursively (one
paginated LIST of 1000 keys per request), and its folders are the key prefixes; a store has
no symlinks, so the same rules apply to the same names.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from digi2real.data.images import ImageError
from digi2real.data.store import ObjectPath, entry_path, location, object_scandir

logger = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
IGNORED_NAMES = frozenset({"__MACOSX", "lost+found", "@eaDir", "$RECYCLE.BIN"})

LAYOUTS = ("digiface", "imagefolder")
STAGE_SCAN = "scan"
# the scan row of an image directly in the source root (SRC given one level too deep?)
OUTSIDE_IDENTITY = "image outside identity folder"
STAGE_READ = "read"

_DIGITS = re.compile(r"(\d+)")


def layout_is_aligned(layout: str) -> bool:
    """Whether images of ``layout`` are already aligned 112x112 crops (detection skipped)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return layout == "digiface"


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def natural_key(name: str) -> tuple:
    """Sort key putting ``2.png`` before ``10.png``; total and stable (raw name breaks ties)."""
    normalised = nfc(name)
    parts = []
    for index, run in enumerate(_DIGITS.split(normalised)):
        if not run:
            continue
        if index % 2:  # odd positions of re.split with one group are the digit runs
            parts.append((0, int(run), ""))
        else:
            parts.append((1, 0, run.casefold()))
    return (tuple(parts), normalised, name)


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes the file system name could not decode become \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an identity or file name, or None when it is fine."""
    if name.isascii() and name.isprintable() and "\\" not in name and not name.isspace():
        return None  # the common case, decided without a per-character scan
    if any("\udc80" <= char <= "\udcff" for char in name):
        return "name is not valid UTF-8"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "name contains control characters"
    if "\\" in name:
        return "name contains a backslash"
    if not name.strip():
        return "name is blank"
    return None


@dataclass
class IdentitySource:
    name: str  # NFC-normalised identity name
    files: list[Path]  # image files, natural order
    folder: str = ""  # the folder's name on disk (differs from name when not NFC)

    def __post_init__(self) -> None:
        if not self.folder:
            self.folder = self.name


@dataclass
class ErrorRow:
    path: str  # relative to the dataset root, POSIX
    identity: str
    stage: str
    reason: str
    shard: int | None = None


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` as POSIX text (the form used in error rows)."""
    return printable(Path(os.path.relpath(path, root)).as_posix())


def error_row_for(
    error: ImageError,
    *,
    root: str | Path,
    identity: str,
    stage: str = STAGE_READ,
    shard: int | None = None,
) -> ErrorRow:
    """The error row for an image that failed to decode."""
    path = relative_path(error.path, root) if error.path is not None else ""
    reason = error.reason + (f": {error.detail}" if error.detail else "")
    return ErrorRow(path=path, identity=identity, stage=stage, reason=reason, shard=shard)


SelectionKind = Literal["all", "names", "range", "first"]


@dataclass(frozen=True)
class IdentitySelection:
    """Which identities of a dataset to use.

    Specs (``from_spec``): ``all``; ``N`` or ``first:N`` (the first N sorted names);
    ``START:STOP`` (a slice of the sorted names, either end optional);
    ``names:a,b,c`` (explicit names); ``@FILE`` or ``file:FILE`` (one name per line, blank
    lines and ``#`` comments ignored). Explicit names must all exist; the result is always in
    sorted-name order.
    """

    kind: SelectionKind = "all"
    names: tuple[str, ...] = ()
    start: int | None = None
    stop: int | None = None
    count: int | None = None
    source: str = field(default="", compare=False)  # the file names came from, if any

    def __post_init__(self) -> None:
        kinds = ("all", "names", "range", "first")
        if self.kind not in kinds:
            raise ValueError(f"unknown selection kind {self.kind!r}; valid: {', '.join(kinds)}")
        if self.kind == "names":
            if not self.names:
                raise ValueError("an explicit identity selection needs at least one name")
            normalised = tuple(nfc(name) for name in self.names)
            seen: set[str] = set()
            duplicates = sorted({name for name in normalised if name in seen or seen.add(name)})
            if duplicates:
                raise ValueError(f"identity selection lists names twice: {_preview(duplicates)}")
            object.__setattr__(self, "names", normalised)
        if self.kind == "first" and (self.count is None or self.count < 1):
            raise ValueError(f"first:N needs N >= 1, got {self.count!r}")
        if self.kind == "range":
            for label, value in (("start", self.start), ("stop", self.stop)):
                if value is not None and value < 0:
                    raise ValueError(f"selection range {label} must be >= 0, got {value}")
            if self.start is not None and self.stop is not None and self.stop <= self.start:
                raise ValueError(
                    f"selection range {self.start}:{self.stop} is empty (stop must be > start)"
                )

    @classmethod
    def all(cls) -> IdentitySelection:
        return cls()

    @classmethod
    def of_names(cls, names: Iterable[str]) -> IdentitySelection:
        return cls(kind="names", names=tuple(names))

    @classmethod
    def range(cls, start: int | None, stop: int | None) -> IdentitySelection:
        return cls(kind="range", start=start, stop=stop)

    @classmethod
    def first(cls, count: int) -> IdentitySelection:
        return cls(kind="first", count=count)

    @classmethod
    def from_file(cls, path: str | Path) -> IdentitySelection:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"identity list file not found: {path}")
        names = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
        if not names:
            raise ValueError(f"identity list file {path} holds no names")
        return cls(kind="names", names=tuple(names), source=str(path))

    @classmethod
    def from_spec(cls, spec: str | None) -> IdentitySelection:
        help_text = "valid: all, N, first:N, START:STOP, names:a,b,c, @FILE or file:FILE"
        text = (spec or "all").strip()
        if text == "all":
            return cls.all()
        if text.startswith("@") or text.startswith("file:"):
            return cls.from_file(text[1:] if text.startswith("@") else text[len("file:") :])
        if text.startswith("names:"):
            names = [name.strip() for name in text[len("names:") :].split(",")]
            if not all(names):
                raise ValueError(f"empty name in identity selection {spec!r}; {help_text}")
            return cls.of_names(names)
        if text.startswith("first:"):
            return cls.first(_parse_int(text[len("first:") :], spec, help_text))
        if ":" in text:
            start_text, _, stop_text = text.partition(":")
            start = _parse_int(start_text, spec, help_text) if start_text.strip() else None
            stop = _parse_int(stop_text, spec, help_text) if stop_text.strip() else None
            return cls.range(start, stop)
        return cls.first(_parse_int(text, spec, help_text))

    def to_spec(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "first":
            return f"first:{self.count}"
        if self.kind == "range":
            start = "" if self.start is None else str(self.start)
            stop = "" if self.stop is None else str(self.stop)
            return f"{start}:{stop}"
        return "names:" + ",".join(self.names)

    def apply(self, names: Sequence[str], *, known: Iterable[str] = ()) -> list[str]:
        """The selected subset of sorted ``names``.

        ``known`` are further names that exist but were skipped (so an explicit list naming
        them is not an unknown-name error; they are simply not returned).
        """
        if self.kind == "all":
            return list(names)
        if self.kind == "first":
            return list(names[: self.count])
        if self.kind == "range":
            return list(names[self.start : self.stop])
        present = set(names)
        unknown = sorted(set(self.names) - present - set(known))
        if unknown:
            raise ValueError(
                f"{len(unknown)} selected identit{'y' if len(unknown) == 1 else 'ies'} not in "
                f"the dataset: {_preview(unknown)}"
            )
        wanted = set(self.names)
        return [name for name in names if name in wanted]


def _parse_int(text: str, spec: str | None, help_text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(
            f"bad identity selection {spec!r}: {text!r} is not an integer; {help_text}"
        ) from None


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(printable(name)) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _resolve_inside(path: Path, root_resolved: Path) -> tuple[Path | None, str | None]:
    """Resolve a symlink; (target, None) when inside root, else (None, reason)."""
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return None, "broken symlink"
    except RuntimeError:  # pathlib before 3.13 reports loops as RuntimeError
        return None, "symlink loop"
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return None, "symlink loop"
        return None, f"unresolvable symlink ({type(exc).__name__})"
    if not target.is_relative_to(root_resolved):
        return None, "symlink resolves outside the dataset root"
    return target, None


Scandir = Callable[[Any], Any]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


@dataclass
class _Candidate:
    name: str  # NFC
    folder: str  # raw on-disk name
    path: Any  # Path or ObjectPath


def _list_root(
    root: Any,
    root_resolved: Any,
    extensions: frozenset[str],
    rows: list[ErrorRow],
    scandir: Scandir = os.scandir,
) -> list[_Candidate]:
    candidates = []
    with scandir(root) as entries:
        for entry in entries:
            name = entry.name
            if _is_hidden(name):
                continue
            shown = printable(name)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if entry.is_symlink():
                _, problem = _resolve_inside(Path(entry.path), root_resolved)
                if problem is not None:
                    rows.append(ErrorRow(shown, printable(nfc(name)), STAGE_SCAN, problem))
                    continue
            if not is_dir:
                if os.path.splitext(name)[1].lower() in extensions:
                    rows.append(ErrorRow(shown, "", STAGE_SCAN, OUTSIDE_IDENTITY))
                continue
            problem = name_problem(name)
            if problem is not None:
                rows.append(ErrorRow(shown, shown, STAGE_SCAN, f"invalid identity name: {problem}"))
                continue
            candidates.append(_Candidate(nfc(name), name, entry_path(entry)))
    return candidates


def _drop_collisions(
    candidates: list[_Candidate], *, case_insensitive: bool, rows: list[ErrorRow]
) -> tuple[list[_Candidate], set[str]]:
    def key(candidate: _Candidate) -> str:
        return candidate.name.casefold() if case_insensitive else candidate.name

    groups: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(key(candidate), []).append(candidate)
    kept, dropped = [], set()
    rule = "after NFC normalisation and case folding" if case_insensitive else "after NFC"
    for group in groups.values():
        if len(group) == 1:
            kept.append(group[0])
            continue
        folders = sorted(printable(member.folder) for member in group)
        for member in group:
            dropped.add(member.name)
            rows.append(
                ErrorRow(
                    printable(member.folder),
                    printable(member.name),
                    STAGE_SCAN,
                    f"identity name collides {rule} with {len(group) - 1} other folder(s): "
                    + ", ".join(repr(folder) for folder in folders),
                )
            )
    if not case_insensitive:
        folded: dict[str, list[str]] = {}
        for candidate in kept:
            folded.setdefault(candidate.name.casefold(), []).append(candidate.name)
        clashes = [names for names in folded.values() if len(names) > 1]
        if clashes:
            logger.warning(
                "%d group(s) of identity names differ only in case (e.g. %s); they stay "
                "distinct, but would merge on a case-insensitive file system",
                len(clashes),
                _preview(sorted(clashes[0])),
            )
    return kept, dropped


def _scan_identity(
    candidate: _Candidate,
    root: Any,
    root_resolved: Any,
    extensions: frozenset[str],
    scandir: Scandir = os.scandir,
) -> tuple[IdentitySource | None, list[ErrorRow]]:
    rows: list[ErrorRow] = []
    identity = printable(candidate.name)
    folder = printable(candidate.folder)
    files: list[tuple[tuple, Any]] = []
    try:
        with scandir(candidate.path) as entries:
            for entry in entries:
                name = entry.name
                if _is_hidden(name):
                    continue
                shown = f"{folder}/{printable(name)}"
                is_image_name = os.path.splitext(name)[1].lower() in extensions
                if entry.is_symlink():
                    target, problem = _resolve_inside(Path(entry.path), root_resolved)
                    if target is None:
                        if is_image_name or problem != "broken symlink":
                            rows.append(ErrorRow(shown, identity, STAGE_SCAN, str(problem)))
                        continue
                    is_dir, is_file = target.is_dir(), target.is_file()
                else:
                    try:
                        is_dir, is_file = entry.is_dir(), entry.is_file()
                    except OSError as exc:
                        rows.append(ErrorRow(shown, identity, STAGE_SCAN, type(exc).__name__))
                        continue
                if is_dir:
                    rows.append(ErrorRow(shown, identity, STAGE_SCAN, "nested folder ignored"))
                    continue
                if not is_image_name:
                    continue
                if not is_file:
                    rows.append(ErrorRow(shown, identity, STAGE_SCAN, "not a regular file"))
                    continue
                problem = name_problem(name)
                if problem is not None:
                    rows.append(
                        ErrorRow(shown, identity, STAGE_SCAN, f"invalid file name: {problem}")
                    )
                    continue
                files.append((natural_key(name), entry_path(entry)))
    except OSError as exc:
        rows.append(
            ErrorRow(folder, identity, STAGE_SCAN, f"unreadable folder ({type(exc).__name__})")
        )
        return None, rows
    if not files:
        rows.append(ErrorRow(folder, identity, STAGE_SCAN, "no image files"))
        return None, rows
    files.sort(key=lambda item: item[0])
    paths = [path for _, path in files]
    return IdentitySource(candidate.name, paths, candidate.folder), rows


def scan_dataset(
    root: str | Path | ObjectPath,
    *,
    select: IdentitySelection | str | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    case_insensitive: bool = False,
    workers: int = 1,
) -> tuple[list[IdentitySource], list[ErrorRow]]:
    """Identity folders of ``root`` (selected, sorted) and the rows for what was skipped.

    ``select`` is an ``IdentitySelection`` or its spec text (default: all). ``workers`` > 1
    lists identity folders from a thread pool: it helps on network file systems, not on a
    local disk (about 10 us per file there, a 1.3M-file DigiFace-1M in ~10-15 s); the
    result does not depend on it.
    """
    root = location(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root is not a folder: {root}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if select is None or isinstance(select, str):
        select = IdentitySelection.from_spec(select)
    normalised_extensions = frozenset(
        (ext if ext.startswith(".") else f".{ext}").lower() for ext in extensions
    )
    if not normalised_extensions:
        raise ValueError("extensions must name at least one file extension")
    root_resolved = root.resolve()
    scandir = object_scandir(root) if isinstance(root, ObjectPath) else os.scandir

    rows: list[ErrorRow] = []
    candidates = _list_root(root, root_resolved, normalised_extensions, rows, scandir)
    candidates, collided = _drop_collisions(
        candidates, case_insensitive=case_insensitive, rows=rows
    )
    by_name = {candidate.name: candidate for candidate in candidates}
    skipped_names = collided | {nfc(row.identity) for row in rows if row.identity}
    selected = select.apply(sorted(by_name), known=skipped_names)

    def scan_one(name: str) -> tuple[IdentitySource | None, list[ErrorRow]]:
        return _scan_identity(by_name[name], root, root_resolved, normalised_extensions, scandir)

    if workers > 1 and len(selected) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(scan_one, selected))
    else:
        results = [scan_one(name) for name in selected]

    sources = []
    for source, identity_rows in results:
        rows.extend(identity_rows)
        if source is not None:
            sources.append(source)
    logger.info(
        "scanned %s: %d identities, %d images, %d skipped item(s)",
        root,
        len(sources),
        sum(len(source.files) for source in sources),
        len(rows),
    )
    return sources, rows


def apply_min_images(
    sources: Sequence[IdentitySource],
    usable_counts: Mapping[str, int],
    min_images: int,
    *,
    stage: str = STAGE_READ,
) -> tuple[list[IdentitySource], list[ErrorRow]]:
    """Keep identities with at least ``min_images`` usable images; a row for each other one.

    ``usable_counts`` maps identity name to the number of its images that decoded (and,
    for unaligned inputs, had a detectable face).
    """
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    missing = [source.name for source in sources if source.name not in usable_counts]
    if missing:
        raise ValueError(f"usable_counts lacks identities: {_preview(missing)}")
    kept, rows = [], []
    for source in sources:
        count = usable_counts[source.name]
        if count >= min_images:
            kept.append(source)
        else:
            rows.append(
                ErrorRow(
                    printable(source.folder),
                    printable(source.name),
                    stage,
                    f"too few usable images ({count} < {min_images})",
                )
            )
    return kept, rows


def image_files(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Every image under ``folder`` (at any depth, e.g. FFHQ's numbered subfolders, unless
    ``recursive`` is false), hidden entries skipped, sorted."""
    folder = Path(folder)
    if not recursive:
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return found
