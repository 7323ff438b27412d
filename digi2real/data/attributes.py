"""Per-image attributes of a run's source renders: their names, where they come from, how
they are stored, and the bins ``--balance`` spreads outputs over.

Names say where a value comes from. Ground truth keeps its own name: ``yaw``, ``pitch`` and
``roll`` of a SynthFace head pose, ``landmarks`` of a renderer's label file, or any column of
an ``--attributes`` table. What digi2real computes from the image ends in ``_est``
(:data:`ESTIMATES`), so an estimate never overwrites, or passes for, ground truth.

A run's ground truth is read once when it is planned and kept in
``OUT/.digi2real/attributes.parquet`` (one row per planned source image: ``path`` relative to
the source root, the scalar columns, ``landmarks`` as a list of [x, y] pixels and
``segmentation``, a class-id mask's path relative to the source root); a resume reads that
file, never the labels again. Estimates are computed per shard and cached beside its
embeddings.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

PATH = "path"
LANDMARKS = "landmarks"
SEGMENTATION = "segmentation"
ESTIMATE_SUFFIX = "_est"
# computed from each source image (face/estimates.py): what each means is documented there
ESTIMATES = (
    "yaw_est",
    "pitch_est",
    "roll_est",
    "face_size_est",
    "sharpness_est",
    "brightness_est",
)
# computed by the optional buffalo_l models a weights dir may hold (face/attribute_models.py),
# by weights group
MODEL_ESTIMATES: dict[str, tuple[str, ...]] = {
    "landmarks3d": ("yaw_3d_est", "pitch_3d_est", "roll_3d_est"),
    "genderage": ("age_est", "gender_est"),
}
ALL_ESTIMATES = ESTIMATES + tuple(n for names in MODEL_ESTIMATES.values() for n in names)
# measured on each output, in its manifest row
OUTPUT_YAW, OUTPUT_PITCH = "output_yaw_est", "output_pitch_est"
NME = "landmark_nme"
ATTRIBUTES_FROM = "attributes_from"
LABEL_MATRIX = "label_matrix"
OUTPUT_FIELDS = (ATTRIBUTES_FROM, LABEL_MATRIX, NME, OUTPUT_YAW, OUTPUT_PITCH)
LANDMARK_COUNTS = (68, 70)  # iBUG-68, or iBUG-68 and the two pupils
MAX_BINS = 100
# the manifest's own columns (data/manifest.py) a user column must not shadow
_MANIFEST_NAMES = frozenset(
    {
        "key",
        "identity",
        "label",
        "index",
        "attempt",
        "seed",
        "interp_kind",
        "source_paths",
        "interp_weights",
        "sampler",
        "steps",
        "guidance",
        "dtype",
        "shift_method",
        "shift_alpha",
        "init_path",
        "init_strength",
        "lora_digest",
        "decoder",
        "similarity",
        "shard",
        "weights_digest",
        "version",
    }
)
RESERVED = _MANIFEST_NAMES | {PATH, SEGMENTATION, *OUTPUT_FIELDS}
_SCALAR_TYPES = {
    "float64": pa.float64(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
    "string": pa.string(),
}
_TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".ndjson": "json"}
MAX_TABLE_BYTES = 1 << 30


class AttributeSpecError(ValueError):
    """A bad attribute table or balance spec: one line naming the column or the value."""


def normal_path(text: str) -> str:
    """A source-relative path as attributes key it: POSIX, NFC, no leading ``./``."""
    path = PurePosixPath(unicodedata.normalize("NFC", text.replace("\\", "/")))
    return path.as_posix().removeprefix("./")


def check_landmarks(value: Any, where: str) -> np.ndarray:
    """(N, 2) float64 landmarks, N one of :data:`LANDMARK_COUNTS`, all finite."""
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise AttributeSpecError(f"{where}: landmarks must be a list of [x, y] numbers") from None
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] not in LANDMARK_COUNTS:
        raise AttributeSpecError(
            f"{where}: landmarks must be 68 or 70 [x, y] points, got shape {points.shape}"
        )
    if not np.isfinite(points).all():
        raise AttributeSpecError(f"{where}: landmarks hold a non-finite value")
    return points


@dataclass
class SourceAttributes:
    """Ground truth per source image (path relative to the source root)."""

    columns: dict[str, pa.DataType] = field(default_factory=dict)  # scalar name -> type
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {name: value}
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)  # path -> (N, 2)
    segmentation: dict[str, str] = field(default_factory=dict)  # path -> mask path
    origin: str = "none"  # facesynthetics | synthface | table | none
    counts: dict[str, int] = field(default_factory=dict)  # table rows matched / unmatched...

    @property
    def names(self) -> list[str]:
        """Every attribute a ``--where`` may name: the scalar columns (landmarks are not)."""
        return sorted(self.columns)

    def __bool__(self) -> bool:
        return bool(self.columns or self.landmarks or self.segmentation)

    def value(self, path: str, column: str) -> Any:
        return self.rows.get(path, {}).get(column)

    def restrict(self, paths: set[str]) -> SourceAttributes:
        """Only the rows of ``paths`` (the planned images)."""
        return SourceAttributes(
            dict(self.columns),
            {p: r for p, r in self.rows.items() if p in paths},
            {p: v for p, v in self.landmarks.items() if p in paths},
            {p: v for p, v in self.segmentation.items() if p in paths},
            self.origin,
            dict(self.counts),
        )

    def to_table(self) -> pa.Table:
        paths = sorted(set(self.rows) | set(self.landmarks) | set(self.segmentation))
        arrays: dict[str, pa.Array] = {PATH: pa.array(paths, pa.string())}
        for name in sorted(self.columns):
            arrays[name] = pa.array(
                [self.rows.get(p, {}).get(name) for p in paths], self.columns[name]
            )
        arrays[LANDMARKS] = pa.array(
            [self.landmarks[p].tolist() if p in self.landmarks else None for p in paths],
            pa.list_(pa.list_(pa.float64(), 2)),
        )
        arrays[SEGMENTATION] = pa.array([self.segmentation.get(p) for p in paths], pa.string())
        table = pa.table(arrays)
        meta = {"origin": self.origin, "counts": self.counts}
        return table.replace_schema_metadata({"digi2real": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_table(cls, table: pa.Table) -> SourceAttributes:
        meta = json.loads((table.schema.metadata or {}).get(b"digi2real", b"{}"))
        paths = table.column(PATH).to_pylist()
        scalar = [n for n in table.column_names if n not in (PATH, LANDMARKS, SEGMENTATION)]
        columns = {name: table.schema.field(name).type for name in scalar}
        values = {name: table.column(name).to_pylist() for name in scalar}
        rows = {
            p: {n: values[n][i] for n in scalar if values[n][i] is not None}
            for i, p in enumerate(paths)
        }
        landmarks = {
            p: np.asarray(v, np.float64)
            for p, v in zip(paths, table.column(LANDMARKS).to_pylist(), strict=True)
            if v is not None
        }
        segmentation = {
            p: v
            for p, v in zip(paths, table.column(SEGMENTATION).to_pylist(), strict=True)
            if v is not None
        }
        return cls(
            columns,
            rows,
            landmarks,
            segmentation,
            meta.get("origin", "none"),
            meta.get("counts", {}),
        )


# -- an --attributes table -----------------------------------------------------------------


def _read_raw(path: Path) -> pa.Table:
    kind = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise AttributeSpecError(
            f"attribute table {path.name}: unknown format; use .csv, .parquet or .jsonl"
        )
    if not path.is_file():
        raise FileNotFoundError(f"attribute table not found: {path}")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise AttributeSpecError(f"attribute table {path.name} is larger than 1 GiB")
    try:
        if kind == "csv":
            import pyarrow.csv as pcsv

            # an empty cell is a missing value, also in a text column
            return pcsv.read_csv(
                path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True)
            )
        if kind == "json":
            import pyarrow.json as pjson

            return pjson.read_json(path)
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AttributeSpecError(f"attribute table {path.name} is not readable: {first}") from None


def _scalar_type(name: str, kind: pa.DataType, table: str) -> pa.DataType:
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return pa.float64()
    if pa.types.is_integer(kind):
        return pa.int64()
    if pa.types.is_boolean(kind):
        return pa.bool_()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_null(kind):
        return pa.float64()  # an all-empty column
    raise AttributeSpecError(
        f"attribute table {table}: column {name!r} holds {kind}; attributes are numbers, "
        "booleans or text (only 'landmarks' may be a list)"
    )


def read_attribute_table(path: str | Path) -> SourceAttributes:
    """An ``--attributes`` table: one row per source image, keyed by ``path`` (relative to
    the source root); scalar columns of any name and optionally ``landmarks``."""
    path = Path(path)
    raw = _read_raw(path)
    if PATH not in raw.column_names:
        raise AttributeSpecError(
            f"attribute table {path.name} has no 'path' column (the image path relative to "
            f"the source root); columns: {', '.join(raw.column_names[:10])}"
        )
    if not (pa.types.is_string(raw.schema.field(PATH).type)):
        raise AttributeSpecError(f"attribute table {path.name}: column 'path' must be text")
    names = raw.column_names
    duplicate_names = sorted({n for n in names if names.count(n) > 1})
    if duplicate_names:
        raise AttributeSpecError(f"attribute table {path.name} repeats columns {duplicate_names}")
    for name in names:
        if name in (PATH, LANDMARKS):
            continue
        if name in RESERVED:
            raise AttributeSpecError(
                f"attribute table {path.name}: column {name!r} is a name digi2real's outputs "
                "already use; rename it"
            )
        if name.endswith(ESTIMATE_SUFFIX):
            raise AttributeSpecError(
                f"attribute table {path.name}: column {name!r} ends in {ESTIMATE_SUFFIX!r}, "
                "which marks digi2real's own estimates; rename it"
            )
        if not name.isidentifier():
            raise AttributeSpecError(
                f"attribute table {path.name}: column {name!r} is not a plain name (letters, "
                "digits, underscores) a --where can use"
            )
    keys = raw.column(PATH).to_pylist()
    if any(k is None for k in keys):
        raise AttributeSpecError(f"attribute table {path.name}: a row has no 'path'")
    keys = [normal_path(k) for k in keys]
    seen: set[str] = set()
    repeated = sorted({k for k in keys if k in seen or seen.add(k)})
    if repeated:
        raise AttributeSpecError(
            f"attribute table {path.name}: {len(repeated)} path(s) appear twice, e.g. "
            f"{repeated[0]!r}"
        )
    result = SourceAttributes(origin="table")
    for name in names:
        if name in (PATH, LANDMARKS):
            continue
        kind = _scalar_type(name, raw.schema.field(name).type, path.name)
        result.columns[name] = kind
        values = raw.column(name).cast(kind).to_pylist()
        for key, value in zip(keys, values, strict=True):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise AttributeSpecError(
                    f"attribute table {path.name}: column {name!r} holds {value} for {key!r}"
                )
            result.rows.setdefault(key, {})[name] = value
    if LANDMARKS in names:
        column = raw.column(LANDMARKS).to_pylist()
        for key, value in zip(keys, column, strict=True):
            if value is None or value == "":
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise AttributeSpecError(
                        f"attribute table {path.name}: column 'landmarks' of {key!r} is not a "
                        "JSON list of [x, y]"
                    ) from None
            result.landmarks[key] = check_landmarks(value, f"attribute table {path.name}, {key!r}")
    for key in keys:
        result.rows.setdefault(key, {})
    return result


def match_table(table: SourceAttributes, images: list[str]) -> SourceAttributes:
    """``table`` restricted to ``images`` (source-relative paths), with the counts of rows
    that match no image and images that have no row."""
    wanted = set(images)
    keyed = set(table.rows) | set(table.landmarks)
    matched = table.restrict(wanted)
    matched.counts = {
        "rows": len(keyed),
        "matched": len(keyed & wanted),
        "rows_without_image": len(keyed - wanted),
        "images_without_row": len(wanted - keyed),
    }
    return matched


# -- --balance ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Balance:
    """``COLUMN[:BINS]`` (equal-width bins over the selected renders' values; 3 by default)
    or ``COLUMN:E0,E1,...,En`` (explicit edges, n bins). Bins are [E_i, E_i+1), the last one
    closed; a value outside every bin, or missing, is in none."""

    column: str
    bins: int | None = None
    edges: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Balance:
        column, _, rest = text.strip().partition(":")
        column = column.strip()
        if not column.isidentifier():
            raise AttributeSpecError(
                f"--balance {text!r}: {column!r} is not an attribute name; use COLUMN[:BINS] "
                "or COLUMN:E0,E1,... (e.g. yaw:5)"
            )
        rest = rest.strip()
        if not rest:
            return cls(column, bins=3)
        if "," not in rest:
            try:
                bins = int(rest)
            except ValueError:
                raise AttributeSpecError(
                    f"--balance {text!r}: {rest!r} is not a bin count; use COLUMN[:BINS] or "
                    "COLUMN:E0,E1,..."
                ) from None
            if not 2 <= bins <= MAX_BINS:
                raise AttributeSpecError(f"--balance {text!r}: bins must be 2-{MAX_BINS}")
            return cls(column, bins=bins)
        try:
            edges = tuple(float(part) for part in rest.split(","))
        except ValueError:
            raise AttributeSpecError(f"--balance {text!r}: edges must be numbers") from None
        if not 3 <= len(edges) <= MAX_BINS + 1:
            raise AttributeSpecError(f"--balance {text!r}: give 3 to {MAX_BINS + 1} edges")
        if not all(math.isfinite(e) for e in edges) or any(
            b <= a for a, b in zip(edges, edges[1:], strict=False)
        ):
            raise AttributeSpecError(f"--balance {text!r}: edges must be finite and increasing")
        return cls(column, edges=edges)

    def resolve(self, values: np.ndarray) -> tuple[float, ...]:
        """The edges: explicit, or ``bins`` equal widths over the finite ``values``."""
        if self.edges is not None:
            return self.edges
        finite = np.asarray(values, np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            raise AttributeSpecError(f"--balance {self.column}: no render has a value for it")
        low, high = float(finite.min()), float(finite.max())
        if high <= low:
            raise AttributeSpecError(
                f"--balance {self.column}: every render has the same value ({low:g}); "
                "nothing to balance"
            )
        assert self.bins is not None
        return tuple(float(e) for e in np.linspace(low, high, self.bins + 1))


def bin_index(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Each value's bin (0..n-1) under ``edges``, -1 when outside them or missing."""
    values = np.asarray(values, np.float64)
    bounds = np.asarray(edges, np.float64)
    index = np.searchsorted(bounds, values, side="right") - 1
    index[values == bounds[-1]] = len(bounds) - 2  # the last bin is closed
    index[~np.isfinite(values) | (values < bounds[0]) | (values > bounds[-1])] = -1
    return index.astype(np.int64)


def bin_labels(edges: tuple[float, ...]) -> list[str]:
    last = len(edges) - 2
    return [
        f"[{a:g}, {b:g}{']' if i == last else ')'}"
        for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False))
    ]


# -- a labelled layout's ground truth --------------------------------------------------------


def labelled_attributes(
    root: Any, layout: str, sources: list[Any]
) -> tuple[SourceAttributes, list[Any], list[Any]]:
    """Ground truth of every image of ``sources`` (a labelled layout's identities): the
    attributes, the identities keeping the images whose labels read, and an error row (stage
    ``labels``) for each image whose labels are missing or malformed and each identity left
    with no image."""
    from digi2real.data.labelled import STAGE_LABELS, LabelError, read_labels
    from digi2real.data.readers import ErrorRow, IdentitySource, printable

    result = SourceAttributes(origin=layout)
    kept: list[IdentitySource] = []
    rows: list[ErrorRow] = []
    for source in sources:
        files = []
        for file in source.files:
            relative = normal_path(str(file.relative_to(root)))
            try:
                labels = read_labels(root, relative, layout)
            except LabelError as error:
                rows.append(ErrorRow(printable(relative), source.name, STAGE_LABELS, error.reason))
                continue
            files.append(file)
            result.rows[relative] = dict(labels.scalars)
            for name in labels.scalars:
                result.columns.setdefault(name, pa.float64())
            if labels.landmarks is not None:
                result.landmarks[relative] = labels.landmarks
            if labels.segmentation is not None:
                result.segmentation[relative] = labels.segmentation
        if files:
            kept.append(IdentitySource(source.name, files, source.folder))
        else:
            rows.append(
                ErrorRow(source.folder, source.name, STAGE_LABELS, "no image with readable labels")
            )
    return result, kept, rows


def merge(ground: SourceAttributes, table: SourceAttributes) -> SourceAttributes:
    """A layout's ground truth and an ``--attributes`` table together; a column both give is
    refused (which one is the truth?)."""
    if not ground:
        return table
    clash = sorted(set(ground.columns) & set(table.columns))
    if clash or (ground.landmarks and table.landmarks):
        names = clash or [LANDMARKS]
        raise AttributeSpecError(
            f"the attribute table gives {', '.join(names)}, which the {ground.origin} labels "
            "already give; drop them from the table"
        )
    merged = SourceAttributes(
        {**ground.columns, **table.columns},
        {
            p: {**ground.rows.get(p, {}), **table.rows.get(p, {})}
            for p in set(ground.rows) | set(table.rows)
        },
        {**ground.landmarks, **table.landmarks},
        dict(ground.segmentation),
        f"{ground.origin}+table",
        dict(table.counts),
    )
    return merged


# -- what a run does with attributes ----------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """A run's attribute options resolved against its sources' attributes.

    ``active``: the run carries attributes at all (a run without any writes what it always
    wrote, byte for byte); ``estimates``: source images are estimated (``attributes.estimate``
    or an ``_est`` name in ``where``/``balance``); ``geometry``: landmarks and masks are
    carried (the source has them and ``init_strength`` > 0)."""

    attributes: SourceAttributes
    where: Any = None  # data.expression.Expression
    balance: Balance | None = None
    edges: tuple[float, ...] | None = None
    estimates: bool = False
    geometry: bool = False
    models: tuple[str, ...] = ()  # the optional attribute models (MODEL_ESTIMATES) used

    @property
    def estimate_names(self) -> list[str]:
        """The ``*_est`` columns of the run's source images."""
        if not self.estimates:
            return []
        return list(ESTIMATES) + [n for group in self.models for n in MODEL_ESTIMATES[group]]

    @property
    def active(self) -> bool:
        return (
            bool(self.attributes)
            or self.estimates
            or self.where is not None
            or (self.balance is not None)
        )

    @property
    def scalar_names(self) -> list[str]:
        return self.attributes.names + self.estimate_names

    def fields(self) -> list[pa.Field]:
        """The manifest columns this run adds (after the fixed ones), in order."""
        if not self.active:
            return []
        fields = [pa.field(n, self.attributes.columns[n]) for n in self.attributes.names]
        fields += [pa.field(n, pa.float64()) for n in self.estimate_names]
        fields.append(pa.field(ATTRIBUTES_FROM, pa.string()))
        if self.geometry:
            fields += [
                pa.field(LANDMARKS, pa.list_(pa.list_(pa.float64(), 2))),
                pa.field(LABEL_MATRIX, pa.list_(pa.float64(), 6)),
                pa.field(NME, pa.float64()),
            ]
        fields += [pa.field(OUTPUT_YAW, pa.float64()), pa.field(OUTPUT_PITCH, pa.float64())]
        return fields


def resolve_control(
    config: Any,
    attributes: SourceAttributes,
    edges: tuple[float, ...] | None = None,
    models: tuple[str, ...] = (),
) -> Control:
    """The :class:`Control` of ``config`` (a :class:`~digi2real.config.Config`) over
    ``attributes``, with the optional attribute ``models`` the weights dir holds; a ``where``
    or ``balance`` naming an unknown attribute, or an estimate whose model is absent, is an
    :class:`~digi2real.data.expression.ExpressionError` / :class:`AttributeSpecError`."""
    from digi2real.data.expression import parse_expression

    options = config.attributes
    known = attributes.names + list(ALL_ESTIMATES)
    where = parse_expression(options.where, known=known) if options.where else None
    balance = Balance.parse(options.balance) if options.balance else None
    named = set(where.names if where is not None else ())
    if balance is not None:
        if balance.column not in known:
            hint = (
                f"; its estimate is {balance.column + ESTIMATE_SUFFIX!r}"
                if balance.column + ESTIMATE_SUFFIX in known
                else ""
            )
            raise AttributeSpecError(
                f"--balance: unknown attribute {balance.column!r}{hint}; known: " + ", ".join(known)
            )
        named.add(balance.column)
    for group, names in MODEL_ESTIMATES.items():
        missing = sorted(named & set(names))
        if missing and group not in models:
            raise AttributeSpecError(
                f"{', '.join(missing)} come(s) from the optional {group} model, which the "
                f"weights dir does not hold: digi2real weights download --with {group}"
            )
    estimates = options.estimate or bool(named & set(ALL_ESTIMATES))
    has_geometry = bool(attributes.landmarks or attributes.segmentation)
    if options.geometry == "carry" and not has_geometry:
        raise AttributeSpecError(
            "attributes.geometry = 'carry', but the source has no landmarks or masks to carry"
        )
    geometry = options.geometry != "off" and has_geometry and config.generation.init_strength > 0
    used = tuple(group for group in MODEL_ESTIMATES if group in models) if estimates else ()
    return Control(attributes, where, balance, edges, estimates, geometry, used)


def estimates_wanted(config: Any) -> bool:
    """Whether a run estimates its source images: ``attributes.estimate``, or an ``_est``
    name in ``where`` or ``balance`` (what :func:`resolve_control` decides, without the
    sources)."""
    from digi2real.data.expression import parse_expression

    options = config.attributes
    named = set(parse_expression(options.where).names) if options.where else set()
    if options.balance:
        named.add(Balance.parse(options.balance).column)
    return options.estimate or any(name.endswith(ESTIMATE_SUFFIX) for name in named)


def column_values(attributes: SourceAttributes, name: str, paths: list[str]) -> np.ndarray:
    """One scalar column over ``paths`` as ``--where`` reads it: numbers as float64 (NaN where
    missing), booleans as bool (object with None where missing), text as object."""
    kind = attributes.columns[name]
    raw = [attributes.rows.get(path, {}).get(name) for path in paths]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return np.array([np.nan if v is None else float(v) for v in raw], np.float64)
    if pa.types.is_boolean(kind) and all(v is not None for v in raw):
        return np.array(raw, dtype=bool)
    return np.array(raw, dtype=object)


def check_options(config: Any) -> None:
    """``where`` and ``balance`` well-formed (names are checked once the source is read):
    before anything runs or is written."""
    from digi2real.data.expression import parse_expression

    if config.attributes.where:
        parse_expression(config.attributes.where)
    if config.attributes.balance:
        Balance.parse(config.attributes.balance)
