"""Attributes in the report: what a run that carries per-image attributes made of them.

Only a run whose manifest has attribute columns (:data:`~digi2real.data.attributes.
ATTRIBUTES_FROM` among them) gets this section; every other report stays as it was, byte for
byte. The section (``report.json["attributes"]``) holds:

- ``numeric``: per numeric attribute (ground truth, then ``*_est``), the sources' and the
  outputs' distributions and their histograms on shared bin edges. Sources are every planned
  source render (before ``--where``: ``.digi2real/attributes.parquet`` and the per-shard
  estimate caches); an output's value is its dominant render's (the render it was made
  from), read from the manifest. ``attributes.png`` draws them, one panel each.
- ``balance`` (a ``--balance`` run): per bin the requested share (even) against the outputs
  each bin got, and the identities whose per-bin counts differ by more than one, with why.
- ``label_fidelity``: the distribution of ``landmark_nme`` (the output's detected five points
  against its carried landmarks, in % of the inter-pupil distance) and the pose measured on
  the outputs against their renders' (ground truth, else estimated); with what it cannot
  tell (:data:`CANNOT_TELL`). ``landmarks_NNN.png`` draw outputs with their carried landmarks.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from digi2real.analysis.report.dataset import Dataset, read_run_config
from digi2real.analysis.report.figures import _round
from digi2real.analysis.report.pictures import save_figure
from digi2real.data import attributes as attrs
from digi2real.data import fsio, layout
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import MANIFEST_SCHEMA, read_table
from digi2real.data.store import ObjectPath

logger = logging.getLogger(__name__)

ATTRIBUTE_BINS = 20  # histogram bins per attribute, over the sources' and outputs' range
MAX_PANELS = 8  # panels of attributes.png; the JSON has every attribute
NME_LEVELS = (5.0, 10.0)  # % of the inter-pupil distance
# landmark sheets: identities (an even spread over the labels), outputs each, pixels a tile
LANDMARK_IDENTITIES = 8
LANDMARK_IMAGES = 6
LANDMARK_TILE = 160
IBUG_COLOUR, PUPIL_COLOUR = (40, 255, 40), (0, 220, 255)  # green, cyan: visible on skin
_NOT_ATTRIBUTES = frozenset({*attrs.OUTPUT_FIELDS, attrs.LANDMARKS})

CANNOT_TELL = (
    "Label fidelity compares the detector's five points (eye centres, nose tip, mouth "
    "corners) found on each output with the same five points of the landmarks carried from "
    "its render. A low NME says the face still sits where the labels say. It does not show "
    "that the dense 68-point landmarks or the segmentation mask are pixel-exact on the output "
    "(contours, jaw line, hair and ears are not measured), nor that the output keeps the "
    "identity, the expression or looks real."
)
SOURCES_NOTE = (
    "sources: every planned source render (before --where), from the run's ground truth and "
    "estimate caches; outputs: each output's dominant render's value, from the manifest"
)
BALANCE_NOTE = (
    "Requested: an even share of the outputs per bin; per identity the ideal is counts that "
    "differ by at most 1 across the bins. An identity misses it when it has no usable render "
    "in a bin (its targets are spread over the bins it has renders in: a render outside "
    "--where, without a value or that failed to read is in none) or when some of its targets "
    "were rejected (below the similarity threshold after every attempt)."
)
POSE_NOTE = (
    "output_*_est: estimated on each output from the detector's five points; compared with "
    "its dominant render's value. A renderer whose sign convention differs from the "
    "estimate's shows as a negative correlation."
)


def _schema(path: Any) -> pa.Schema:
    source = pa.BufferReader(path.read_bytes()) if isinstance(path, ObjectPath) else path
    return pq.ParquetFile(source).schema_arrow


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)


def _share(part: int, whole: int) -> float | None:
    return _round(part / whole) if whole else None


def summary(values: np.ndarray) -> dict[str, Any]:
    """Count, missing, mean, std, min, median and max of a sample (NaN is missing)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"count": int(finite.size), "missing": int(values.size - finite.size)}
    if finite.size:
        out.update(
            mean=_round(finite.mean()),
            std=_round(finite.std()),
            min=_round(finite.min()),
            median=_round(np.median(finite)),
            max=_round(finite.max()),
        )
    return out


def shared_edges(*samples: np.ndarray | None, bins: int = ATTRIBUTE_BINS) -> np.ndarray:
    """Equal-width edges over the finite values of every sample (one unit wide if constant)."""
    finite = [s[np.isfinite(s)] for s in samples if s is not None]
    values = np.concatenate(finite) if finite else np.zeros(0)
    if values.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


Sources = tuple[list[str], np.ndarray]  # source paths, one attribute's values (NaN: none)


@dataclass
class RunAttributes:
    """What the section is computed from: the manifest's attribute columns (row-aligned with
    the dataset) and the sources' values per numeric attribute."""

    record: dict[str, Any]  # config.yaml's ``attributes`` record
    columns: dict[str, list[Any]]  # manifest column after the fixed ones -> its rows
    numeric: list[str]  # ground truth, then estimates, as the manifest orders them
    sources: dict[str, Sources | None]  # name -> its values over the renders, or unknown
    landmarks: pa.ChunkedArray | None = None  # per row, read row by row (they are large)

    @property
    def names(self) -> list[str]:
        """The attributes an output carries (not the label-fidelity fields)."""
        return [n for n in self.columns if n not in _NOT_ATTRIBUTES]


def has_attributes(dataset: Dataset) -> bool:
    return attrs.ATTRIBUTES_FROM in _schema(dataset.manifest_path).names


def _source_values(out: OutLayout, names: list[str], shards: set[int]) -> dict[str, Any]:
    """Each numeric attribute's values over the source renders: ground truth from
    attributes.parquet, estimates from the shards' caches (None where not found)."""
    found: dict[str, Sources | None] = {name: None for name in names}
    truth = [n for n in names if not n.endswith(attrs.ESTIMATE_SUFFIX)]
    if truth and out.attributes.is_file():
        available = set(_schema(out.attributes).names)
        wanted = [n for n in truth if n in available]
        table = read_table(out.attributes, columns=[attrs.PATH, *wanted])
        paths = table.column(attrs.PATH).to_pylist()
        for name in wanted:
            found[name] = (paths, _floats(table.column(name).to_pylist()))
    estimates = [n for n in names if n.endswith(attrs.ESTIMATE_SUFFIX)]
    caches = [out.estimates_cache(shard) for shard in sorted(shards)]
    caches = [cache for cache in caches if cache.is_file()]
    if estimates and caches:
        tables = [read_table(cache) for cache in caches]  # a path is in one shard only
        for name in estimates:
            having = [table for table in tables if name in table.column_names]
            if having:
                found[name] = (
                    [p for table in having for p in table.column(attrs.PATH).to_pylist()],
                    np.concatenate([_floats(table.column(name).to_pylist()) for table in having]),
                )
    return found


def read_run_attributes(dataset: Dataset) -> RunAttributes:
    out = OutLayout(dataset.out_dir)
    schema = _schema(dataset.manifest_path)
    fixed = set(MANIFEST_SCHEMA.names)
    # the lists (landmarks, the label matrix) are large: only the landmarks are read, as
    # arrow, and only the rows drawn become Python
    names = [
        n for n in schema.names if n not in fixed and n not in (attrs.LANDMARKS, attrs.LABEL_MATRIX)
    ]
    wanted = names + ([attrs.LANDMARKS] if attrs.LANDMARKS in schema.names else [])
    table = read_table(dataset.manifest_path, columns=wanted)
    numeric = [n for n in names if n not in _NOT_ATTRIBUTES and _numeric(schema.field(n).type)]
    shards: set[int] = set()
    for path in (out.plan, dataset.manifest_path):
        if path.is_file() and "shard" in _schema(path).names:
            shards.update(int(s) for s in read_table(path, columns=["shard"])["shard"].to_pylist())
            break
    _, record = read_run_config(dataset.out_dir)
    return RunAttributes(
        record=record.get("attributes") or {},
        columns={n: table.column(n).to_pylist() for n in names},
        numeric=numeric,
        sources=_source_values(out, numeric, shards),
        landmarks=table.column(attrs.LANDMARKS) if attrs.LANDMARKS in wanted else None,
    )


# -- the numbers ----------------------------------------------------------------------------


def numeric_figures(run: RunAttributes) -> dict[str, Any]:
    """Sources vs outputs per numeric attribute, with histograms on shared edges."""
    section: dict[str, Any] = {}
    for name in run.numeric:
        outputs = _floats(run.columns[name])
        known = run.sources[name]
        sources = known[1] if known is not None else None
        edges = shared_edges(sources, outputs)
        section[name] = {
            "kind": "estimate" if name.endswith(attrs.ESTIMATE_SUFFIX) else "ground truth",
            "sources": summary(sources) if sources is not None else None,
            "outputs": summary(outputs),
            "histogram": {
                "edges": [_round(e) for e in edges],
                "sources": np.histogram(sources[np.isfinite(sources)], edges)[0].tolist()
                if sources is not None
                else None,
                "outputs": np.histogram(outputs[np.isfinite(outputs)], edges)[0].tolist(),
            },
        }
    return section


def _spread(counts: np.ndarray) -> np.ndarray:
    return counts.max(axis=1) - counts.min(axis=1) if counts.size else np.zeros(0, np.int64)


def _rejected_bins(
    out: OutLayout, column: str, run: RunAttributes, edges: tuple[float, ...]
) -> tuple[list[str], np.ndarray] | None:
    """The identity and the ``--balance`` bin of each rejected target's dominant render (the
    one the planner chose its bin by), or None when that is unknown."""
    path = out.rejected
    if not path.is_file():
        return None
    needed = ["identity", "source_paths", "interp_weights"]
    if not set(needed) <= set(_schema(path).names):
        return None
    known = run.sources.get(column)
    if known is None:
        return None
    values = dict(zip(known[0], known[1].tolist(), strict=True))
    table = read_table(path, columns=needed)
    names, dominant = [], []
    for identity, sources, weights in zip(
        *(table.column(n).to_pylist() for n in needed), strict=True
    ):
        names.append(identity)
        if not sources:
            dominant.append(np.nan)
            continue
        weights = list(weights or [1.0] * len(sources))
        first = max(range(len(weights)), key=lambda i: (weights[i], -i))
        dominant.append(values.get(sources[first], np.nan))
    return names, attrs.bin_index(np.asarray(dominant, np.float64), edges)


def balance_figures(
    dataset: Dataset, run: RunAttributes, *, examples: int = 20
) -> dict[str, Any] | None:
    """Requested (even) vs achieved outputs per ``--balance`` bin, and the uneven identities."""
    spec, edges = run.record.get("balance"), run.record.get("edges")
    if not spec or not edges:
        return None
    edges = tuple(float(e) for e in edges)
    column = attrs.Balance.parse(spec).column
    labels = attrs.bin_labels(edges)
    section: dict[str, Any] = {
        "spec": spec,
        "column": column,
        "edges": [_round(e) for e in edges],
        "note": BALANCE_NOTE,
    }
    if column not in run.columns:
        section["skipped"] = f"the manifest has no {column!r} column"
        return section
    bins = attrs.bin_index(_floats(run.columns[column]), edges)
    num_bins, num_identities = len(labels), len(dataset.identities)
    inside = bins >= 0
    achieved = np.zeros((num_identities, num_bins), np.int64)
    np.add.at(achieved, (dataset.codes[inside], bins[inside]), 1)
    total = int(inside.sum())
    section["bins"] = [
        {
            "bin": label,
            "requested_share": _round(1.0 / num_bins),
            "outputs": int(achieved[:, b].sum()),
            "share": _share(int(achieved[:, b].sum()), total),
        }
        for b, label in enumerate(labels)
    ]
    section["outside_bins"] = int((~inside).sum())
    planned, rejected = achieved.copy(), np.zeros(num_identities, np.int64)
    known = _rejected_bins(OutLayout(dataset.out_dir), column, run, edges)
    code_of = {name: code for code, name in enumerate(dataset.identities)}
    if known is not None:
        for name, b in zip(*known, strict=True):
            code = code_of.get(name)
            if code is None:  # an identity without any output is not in the dataset
                continue
            rejected[code] += 1
            if b >= 0:
                planned[code, b] += 1
    uneven = np.flatnonzero(_spread(achieved) > 1)
    no_render = uneven[_spread(planned)[uneven] > 1]
    with_rejected = uneven[rejected[uneven] > 0]
    section.update(
        identities=num_identities,
        uneven_identities=int(uneven.size),
        # without the rejected targets' renders (an older rejected.parquet) the planned
        # counts are unknown, and so is why
        uneven_reasons={
            "no_render_in_a_bin": int(no_render.size),
            "rejected_targets": int(with_rejected.size),
            "unexplained": int(np.setdiff1d(uneven, np.union1d(no_render, with_rejected)).size),
        }
        if known is not None
        else None,
        rejected_known=known is not None,
        uneven_examples=[
            {
                "identity": dataset.identities[code],
                "label": dataset.labels[code],
                "outputs": achieved[code].tolist(),
                "planned": planned[code].tolist(),
                "rejected": int(rejected[code]),
            }
            for code in uneven[:examples].tolist()
        ],
    )
    return section


def _pairs(run: RunAttributes, axis: str) -> dict[str, Any] | None:
    """The pose measured on the outputs against their renders' (ground truth, else estimate)."""
    measured = attrs.OUTPUT_YAW if axis == "yaw" else attrs.OUTPUT_PITCH
    if measured not in run.columns:
        return None
    candidates = ((axis, "ground truth"), (axis + attrs.ESTIMATE_SUFFIX, "estimate"))
    usable = [
        (name, reference)
        for name, reference in candidates
        if name in run.numeric and any(v is not None for v in run.columns[name])
    ]
    if not usable:
        return None
    name, reference = usable[0]
    output, render = _floats(run.columns[measured]), _floats(run.columns[name])
    both = np.isfinite(output) & np.isfinite(render)
    output, render = output[both], render[both]
    figures: dict[str, Any] = {
        "reference": reference,
        "column": name,
        "measured": measured,
        "count": int(both.sum()),
        "mae": None,
        "mean_difference": None,
        "correlation": None,
    }
    if output.size:
        figures["mae"] = _round(np.abs(output - render).mean())
        figures["mean_difference"] = _round((output - render).mean())
    if output.size >= 2 and output.std() > 0 and render.std() > 0:
        figures["correlation"] = _round(np.corrcoef(output, render)[0, 1])
    return figures


def label_fidelity(run: RunAttributes) -> dict[str, Any] | None:
    nme = None
    if attrs.NME in run.columns:
        values = _floats(run.columns[attrs.NME])
        finite = values[np.isfinite(values)]
        nme = {"count": int(finite.size), "missing": int(values.size - finite.size)}
        if finite.size:
            nme.update(
                mean=_round(finite.mean()),
                median=_round(np.median(finite)),
                p90=_round(np.percentile(finite, 90)),
                max=_round(finite.max()),
                **{
                    f"share_below_{level:g}": _share(int((finite < level).sum()), finite.size)
                    for level in NME_LEVELS
                },
            )
    pose = {axis: figures for axis in ("yaw", "pitch") if (figures := _pairs(run, axis))}
    if nme is None and not pose:
        return None
    return {
        "nme": nme,
        "pose": pose or None,
        "pose_note": POSE_NOTE if pose else None,
        "cannot_tell": CANNOT_TELL,
    }


# -- the pictures ---------------------------------------------------------------------------


def plot_attributes(numeric: dict[str, Any], path: Path) -> Path:
    """One panel per numeric attribute (at most :data:`MAX_PANELS`): the sources' and the
    outputs' shares per bin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(numeric)[:MAX_PANELS]
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    panels = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, name in zip(panels, names, strict=False):
        histogram = numeric[name]["histogram"]
        edges = np.asarray(histogram["edges"], np.float64)
        for side, color in (("sources", "tab:gray"), ("outputs", "tab:green")):
            counts = histogram[side]
            if counts is None:
                continue
            counts = np.asarray(counts, np.float64)
            total = counts.sum()
            axes.stairs(
                counts / total if total else counts,
                edges,
                color=color,
                label=f"{side} (n={int(total)})",
            )
        axes.set_title(name, fontsize=9)
        axes.set_ylabel("share", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=7)
    for axes in panels[len(names) :]:
        axes.set_visible(False)
    figure.suptitle("Attributes: source renders vs outputs (dominant render's value)")
    return save_figure(figure, path)


def _open_rgb(path: Any) -> Any:
    from digi2real.data.images import ImageError, open_image

    if path is None or not path.is_file():
        return None
    try:
        source = path if isinstance(path, Path) else path.open("rb")
        with open_image(source, path=path) as image:  # allowed formats only, no bomb
            return image.convert("RGB")
    except (ImageError, OSError) as error:
        logger.warning("cannot read %s: %s", path, error)
        return None


@dataclass
class LandmarkTile:
    image: Any  # the output's path (Path or ObjectPath)
    points: np.ndarray  # (N, 2) in the output image's pixels
    nme: float | None


def _draw_tile(tile: LandmarkTile) -> Any:
    from PIL import Image, ImageDraw

    size = LANDMARK_TILE
    image = _open_rgb(tile.image)
    if image is None:
        canvas = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(canvas).text((6, size // 2 - 6), "image missing", fill=(90, 90, 90))
        return canvas
    sx, sy = size / image.width, size / image.height
    canvas = image.resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    # pixel centres: a resize maps x to (x + 0.5) * s - 0.5 (face/landmarks.py)
    scaled = (tile.points + 0.5) * np.array([sx, sy]) - 0.5
    for index, (x, y) in enumerate(scaled.tolist()):
        colour = PUPIL_COLOUR if index >= 68 else IBUG_COLOUR
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour, outline=(0, 0, 0))
    return canvas


def draw_landmark_sheet(rows: Sequence[tuple[str, int, list[LandmarkTile]]], path: Path) -> Path:
    from PIL import Image, ImageDraw

    size, caption, label_width, header = LANDMARK_TILE, 14, 190, 16
    images = max((len(tiles) for _, _, tiles in rows), default=1)
    sheet = Image.new(
        "RGB", (label_width + images * size, header + len(rows) * (size + caption + 4)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (4, 2),
        "outputs with their carried landmarks (green: iBUG-68, cyan: pupils); "
        "nme = label fidelity, % of inter-pupil distance",
        fill=(0, 0, 0),
    )
    for number, (identity, label, tiles) in enumerate(rows):
        top = header + number * (size + caption + 4)
        draw.text((4, top + 4), identity[:30], fill=(0, 0, 0))
        draw.text((4, top + 20), f"label {label}", fill=(60, 60, 60))
        for column, tile in enumerate(tiles):
            x = label_width + column * size
            sheet.paste(_draw_tile(tile), (x, top))
            text = "no face found" if tile.nme is None else f"nme {tile.nme:.1f}%"
            draw.text((x + 2, top + size + 1), text, fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    fsio.atomic_write_bytes(path, buffer.getvalue())
    return path


def landmark_sheets(
    dataset: Dataset,
    run: RunAttributes,
    report_dir: Path,
    *,
    identities: int = LANDMARK_IDENTITIES,
    per_sheet: int = LANDMARK_IDENTITIES,
    images: int = LANDMARK_IMAGES,
) -> list[Path]:
    """``landmarks_NNN.png``: a few identities (an even spread over those whose outputs carry
    landmarks), up to ``images`` outputs each with their landmarks drawn."""
    written: list[Path] = []
    if run.landmarks is not None and identities > 0:
        points = run.landmarks
        nme = run.columns.get(attrs.NME) or [None] * len(points)
        carrying = np.flatnonzero(np.asarray(points.is_valid().to_pylist(), dtype=bool))
        codes = np.unique(dataset.codes[carrying])
        spread = np.unique(np.linspace(0, len(codes) - 1, min(identities, len(codes))).round())
        rows = []
        for code in codes[spread.astype(np.int64)].tolist() if codes.size else []:
            members = carrying[dataset.codes[carrying] == code][:images]
            tiles = [
                LandmarkTile(
                    dataset.out_dir / dataset.paths[row],
                    np.asarray(points[row].as_py(), np.float64),
                    nme[row],
                )
                for row in members.tolist()
            ]
            rows.append((dataset.identities[code], dataset.labels[code], tiles))
        for number, start in enumerate(range(0, len(rows), per_sheet)):
            path = report_dir / layout.landmark_sheet_name(number)
            written.append(draw_landmark_sheet(rows[start : start + per_sheet], path))
    for stale in report_dir.glob(layout.LANDMARK_SHEET_GLOB):
        if stale not in written and layout.is_landmark_sheet(stale.name):
            fsio.remove(stale)
    return written


# -- the section ----------------------------------------------------------------------------


def attribute_section(
    dataset: Dataset, report_dir: Path, *, landmark_identities: int = LANDMARK_IDENTITIES
) -> dict[str, Any] | None:
    """``report.json["attributes"]`` and its pictures, or None (nothing written) for a run
    without attributes."""
    if not has_attributes(dataset):
        return None
    run = read_run_attributes(dataset)
    record = run.record
    numeric = numeric_figures(run)
    section: dict[str, Any] = {
        "origin": record.get("origin"),
        "columns": run.names,
        "geometry": record.get("geometry"),
        "where": record.get("where"),
        "balance_spec": record.get("balance"),
        "note": SOURCES_NOTE,
        "numeric": numeric,
        "not_summarised": [n for n in run.names if n not in run.numeric],
        "png": None,
    }
    if "table" in record:
        section["table"] = record["table"]
    picture = report_dir / layout.REPORT_ATTRIBUTES
    if numeric:
        section["png"] = plot_attributes(numeric, picture).name
        section["png_attributes"] = list(numeric)[:MAX_PANELS]
    elif picture.is_file():
        fsio.remove(picture)
    section["balance"] = balance_figures(dataset, run)
    section["label_fidelity"] = label_fidelity(run)
    sheets = landmark_sheets(dataset, run, report_dir, identities=landmark_identities)
    section["landmark_sheets"] = [path.name for path in sheets]
    return section
