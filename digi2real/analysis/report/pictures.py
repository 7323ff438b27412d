"""The report's pictures: the similarity histogram, the domain gap and the contact sheets.

Each picture is rendered into memory and written with :mod:`digi2real.data.fsio`, so a
reader of ``OUT/report/`` never sees half a PNG.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real.analysis.report.dataset import Dataset, source_root
from digi2real.analysis.report.figures import HIST_BINS, Figures
from digi2real.data import fsio, layout
from digi2real.data.manifest import read_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from digi2real.analysis.domain_gap import Population

logger = logging.getLogger(__name__)


def plot_histogram(figures: Figures, path: Path, *, collision_threshold: float) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    series = (
        ("image vs own centroid (intra)", figures.intra, "tab:blue"),
        ("output vs its target", figures.to_target, "tab:green"),
        ("centroid vs nearest other (inter)", figures.inter[np.isfinite(figures.inter)], "tab:red"),
    )
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    lowest = 1.0
    for name, values, color in series:
        if values.size == 0:
            continue
        counts, _ = np.histogram(values, edges)
        density = counts / max(counts.sum(), 1) / (edges[1] - edges[0])
        axes.stairs(density, edges, label=f"{name} (n={values.size})", color=color, fill=False)
        lowest = min(lowest, float(np.min(values)))
    axes.axvline(collision_threshold, color="black", linestyle="--", linewidth=1)
    axes.text(collision_threshold, axes.get_ylim()[1] * 0.95, " collision", fontsize=8)
    axes.set_xlim(max(-1.0, math.floor(lowest * 10) / 10 - 0.05), 1.0)
    axes.set_xlabel("cosine similarity (ArcFace)")
    axes.set_ylabel("density")
    axes.set_title("Identity consistency vs separation")
    axes.legend(fontsize=8, loc="upper left")
    return save_figure(figure, path)


def save_figure(figure: Figure, path: Path) -> Path:
    """A matplotlib figure as a PNG (no software tag: the bytes depend on the data only)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    fsio.atomic_write_bytes(path, buffer.getvalue())
    return path


# Points drawn per population at most: every k-th row of its uniform sample (in stream order).
GAP_POINTS = 2000


def plot_domain_gap(
    gallery: Population, sources: Population | None, outputs: Population, path: Path, *, space: str
) -> Path:
    """The three clouds on the gallery's first two principal axes, their means marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from digi2real.analysis.domain_gap import principal_axes, project

    axes_2d = principal_axes(gallery.moments)
    figure = Figure(figsize=(6.5, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    clouds = (
        ("real gallery", gallery, "tab:green"),
        ("source renders", sources, "tab:red"),
        ("outputs", outputs, "tab:blue"),
    )
    for name, population, color in clouds:
        if population is None:
            continue
        step = -(-len(population.sample) // GAP_POINTS)
        points = project(population.sample[::step], gallery.moments, axes_2d)
        few = len(points) <= 500
        axes.scatter(
            points[:, 0],
            points[:, 1],
            s=14 if few else 4,
            alpha=0.6 if few else 0.3,
            color=color,
            linewidths=0,
        )
        centre = project(population.moments.mean[None], gallery.moments, axes_2d)[0]
        axes.scatter(
            [centre[0]],
            [centre[1]],
            s=120,
            marker="X",
            color=color,
            edgecolors="black",
            label=f"{name} (n={population.count}, mean marked)",
        )
    axes.set_xlabel("gallery principal axis 1")
    axes.set_ylabel("gallery principal axis 2")
    axes.set_title(f"Domain gap in the {space} space", fontsize=10)
    axes.legend(fontsize=8, loc="best")
    return save_figure(figure, path)


TILE = 112
CAPTION = 14
LABEL_WIDTH = 190
GAP = 12


def _tile(path: Path | None, placeholder: str) -> Image.Image:
    from PIL import Image, ImageDraw

    from digi2real.data.images import ImageError, open_image

    if path is not None and path.is_file():
        try:
            # an image on a store (OUT or SRC given as a URL) is read whole; a source render
            # is untrusted: allowed formats only, no decompression bomb
            source = path if isinstance(path, Path) else path.open("rb")
            with open_image(source, path=path) as image:
                return image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR)
        except (ImageError, OSError) as error:
            logger.warning("cannot read %s: %s", path, error)
    tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    ImageDraw.Draw(tile).text((6, TILE // 2 - 6), placeholder, fill=(90, 90, 90))
    return tile


@dataclass
class SheetRow:
    identity: str
    label: int
    note: str
    sources: list[Path | None]
    outputs: list[tuple[Path, float, float]]  # (image, to target, to centroid)


def draw_contact_sheet(rows: Sequence[SheetRow], path: Path, *, sources: int, images: int) -> Path:
    from PIL import Image, ImageDraw

    cell = TILE + CAPTION
    width = LABEL_WIDTH + sources * TILE + GAP + images * TILE
    sheet = Image.new("RGB", (width, CAPTION + len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 1), "identity", fill=(0, 0, 0))
    draw.text((LABEL_WIDTH, 1), "source", fill=(0, 0, 0))
    draw.text(
        (LABEL_WIDTH + sources * TILE + GAP, 1),
        "generated (t = cos to target, c = cos to centroid)",
        fill=(0, 0, 0),
    )
    for index, row in enumerate(rows):
        top = CAPTION + index * (cell + 4)
        draw.text((4, top + 4), row.identity[:30], fill=(0, 0, 0))
        draw.text((4, top + 20), f"label {row.label}", fill=(60, 60, 60))
        for line, text in enumerate(row.note.split("\n")):
            draw.text((4, top + 36 + 14 * line), text[:30], fill=(170, 0, 0))
        for column, source in enumerate(row.sources[:sources]):
            sheet.paste(_tile(source, "source missing"), (LABEL_WIDTH + column * TILE, top))
        left = LABEL_WIDTH + sources * TILE + GAP
        for column, (image, to_target, to_centroid) in enumerate(row.outputs[:images]):
            x = left + column * TILE
            sheet.paste(_tile(image, "image missing"), (x, top))
            draw.text(
                (x + 2, top + TILE + 1), f"t={to_target:.2f} c={to_centroid:.2f}", fill=(0, 0, 0)
            )
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    fsio.atomic_write_bytes(path, buffer.getvalue())
    return path


def _sheet_identities(figures: dict[str, Any], total: int, count: int) -> list[tuple[int, str]]:
    """Flagged identities first (collisions, leaks), then an even spread over all labels."""
    code_of = {row["label"]: code for code, row in enumerate(figures["identities"])}
    notes: dict[int, list[str]] = {}
    for pair in figures["separation"]["collisions"]:
        notes.setdefault(code_of[pair["label_a"]], []).append(f"~ {pair['b']} {pair['score']:.2f}")
        notes.setdefault(code_of[pair["label_b"]], []).append(f"~ {pair['a']} {pair['score']:.2f}")
    for leak in (figures.get("leakage") or {}).get("leaks", []):
        notes.setdefault(code_of[leak["label"]], []).append(
            f"leak {leak['gallery_identity']} {leak['score']:.2f}"
        )
    chosen = list(notes)[:count]
    if len(chosen) < count:
        spread = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))
        chosen += [int(code) for code in spread if int(code) not in notes]
    return [(code, "\n".join(notes.get(code, []))) for code in chosen[:count]]


def contact_sheets(
    dataset: Dataset,
    figures: Figures,
    report_dir: Path,
    *,
    identities: int = 32,
    per_sheet: int = 8,
    sources: int = 2,
    images: int = 6,
) -> list[Path]:

    chosen = _sheet_identities(figures.figures, len(dataset.identities), identities)
    root = source_root(dataset.out_dir, dataset.config)
    if root is None or not root.is_dir():
        logger.warning("source root %s is gone: contact sheets show no source renders", root)
        root = None
    wanted = np.isin(dataset.codes, [code for code, _ in chosen])
    wanted_rows = np.flatnonzero(wanted)
    source_paths = read_table(dataset.manifest_path, columns=["source_paths"]).column(
        "source_paths"
    )
    rows: list[SheetRow] = []
    for code, note in chosen:
        members = wanted_rows[dataset.codes[wanted_rows] == code]
        unique_sources: list[str] = []
        for row in members:
            for source in source_paths[int(row)].as_py() or []:
                if source not in unique_sources:
                    unique_sources.append(source)
        resolved = [root / source if root is not None else None for source in unique_sources]
        rows.append(
            SheetRow(
                identity=dataset.identities[code],
                label=dataset.labels[code],
                note=note,
                sources=resolved or [None],
                outputs=[
                    (
                        dataset.out_dir / dataset.paths[row],
                        float(figures.to_target[row]),
                        float(figures.intra[row]),
                    )
                    for row in members[:images]
                ],
            )
        )
    written = []
    for number, start in enumerate(range(0, len(rows), per_sheet)):
        path = report_dir / layout.contact_sheet_name(number)
        written.append(
            draw_contact_sheet(
                rows[start : start + per_sheet], path, sources=sources, images=images
            )
        )
    # A re-run with fewer sheets must not leave stale ones the HTML no longer lists.
    for stale in report_dir.glob(layout.CONTACT_SHEET_GLOB):
        if stale not in written and layout.is_contact_sheet(stale.name):
            fsio.remove(stale)
    return written
