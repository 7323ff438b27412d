"""The dataset report: consistency, separation, leakage, diversity, pictures and HTML.

``build_report(OUT)`` reads a converted dataset (manifest + the row-aligned output/target
embedding arrays, memory-mapped) and writes ``OUT/report/``:

- ``report.json``: every figure (below), deterministic (no timestamps, rounded floats);
- ``similarity_hist.png``: image-to-own-centroid (intra) vs centroid-to-nearest-other
  (inter) cosine, plus output-to-target;
- ``contact_NNN.png``: per identity its source render(s) beside its realistic outputs;
- ``index.html`` (``html=True``): a page over all of it that opens from the folder.

Figures: *consistency* (each image's cosine to its identity centroid and to its own
target, per identity and over identities), *separation* (nearest other identity per
identity and the identity pairs whose centroids collide), *leakage* (generated
identities matching a gallery of real identities), *diversity* (mean pairwise cosine
distance per identity and near-duplicate images within an identity) and counts.

``source_report`` runs the separation check on a source dataset's embeddings before any
generation: near-duplicate source identities would become label noise.

Modules: :mod:`.dataset` reads OUT, :mod:`.figures` computes the numbers, :mod:`.pictures`
draws the histogram and contact sheets, :mod:`.html` writes the page, :mod:`.judge` holds
the gallery and judge recognizers, :mod:`.summary` the text the CLI prints; this module
puts them together. Every file is written through :mod:`digi2real.data.fsio`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.analysis.report.dataset import (
    Dataset,
    GalleryEmbedder,
    count_rows,
    load_gallery,
    open_dataset,
)
from digi2real.analysis.report.figures import (
    DEFAULT_COLLISION_THRESHOLD,
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_LEAK_THRESHOLD,
    HIST_BINS,
    REPORT_FORMAT,
    Figures,
    check_threshold,
    compute_figures,
    distribution,
    leakage_figures,
    source_report,
)
from digi2real.analysis.report.html import write_html
from digi2real.analysis.report.judge import (
    Judge,
    gallery_embedder,
    judge_embedder,
    write_judge_outputs,
)
from digi2real.analysis.report.pictures import (
    SheetRow,
    contact_sheets,
    draw_contact_sheet,
    plot_histogram,
)
from digi2real.analysis.report.pose import (
    DEFAULT_PER_IDENTITY,
    Landmarks,
    detector_landmarks,
    plot_pose,
    pose_figures,
)
from digi2real.analysis.report.summary import format_report, format_source
from digi2real.config import Config
from digi2real.data import fsio, layout
from digi2real.data.embeddings import load_embeddings
from digi2real.data.layout import OutLayout
from digi2real.data.store import location

__all__ = [
    "DEFAULT_COLLISION_THRESHOLD",
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_LEAK_THRESHOLD",
    "HIST_BINS",
    "REPORT_FORMAT",
    "Dataset",
    "Figures",
    "GalleryEmbedder",
    "Judge",
    "SheetRow",
    "build_report",
    "compute_figures",
    "contact_sheets",
    "distribution",
    "draw_contact_sheet",
    "gallery_embedder",
    "judge_embedder",
    "leakage_figures",
    "load_gallery",
    "load_report",
    "open_dataset",
    "plot_histogram",
    "run_report",
    "source_report",
    "write_html",
]

logger = logging.getLogger(__name__)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    fsio.atomic_write_bytes(path, text.encode("utf-8"))


def build_report(
    out_dir: str | Path,
    *,
    gallery: str | Path | None = None,
    gallery_embedder: GalleryEmbedder | None = None,
    html: bool = False,
    embed_images: bool = False,
    collision_threshold: float = DEFAULT_COLLISION_THRESHOLD,
    leak_threshold: float = DEFAULT_LEAK_THRESHOLD,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    contact_identities: int = 32,
    identities_per_sheet: int = 8,
    block: int = metrics.DEFAULT_BLOCK,
    judge: Judge | None = None,
    judge_name: str | None = None,
    pose: Landmarks | None = None,
    pose_per_identity: int = DEFAULT_PER_IDENTITY,
) -> dict[str, Any]:
    """Write ``OUT/report/`` (report.json, similarity_hist.png, contact sheets, optional HTML).

    ``gallery``: a ``.npy`` embedding file (identities from its rows file, else one identity
    per row) or a folder of real face images, embedded by ``gallery_embedder(folder)``.
    ``judge``: a stricter recognizer than the generation's, ``(image paths) -> (N, D) unit
    embeddings``: the outputs are re-embedded with it (``report/judge_outputs.npy``) and every
    identity-level figure uses those; the image-to-target figures stay the generation
    recognizer's (a target lives in that recognizer's space). A ``.npy`` gallery must then be
    in the judge's space too.
    ``pose``: landmarks of a face image (e.g. :func:`.pose.detector_landmarks` of the
    weights' detector): the yaw/pitch of up to ``pose_per_identity`` source renders and outputs
    per identity, their spread, and ``pose.png``.
    Returns the report dict written to report.json.
    """
    check_threshold("leak_threshold", leak_threshold)
    if contact_identities < 0 or identities_per_sheet < 1:
        raise ValueError(
            f"contact_identities must be >= 0 and identities_per_sheet >= 1, got "
            f"{contact_identities} and {identities_per_sheet}"
        )
    dataset = open_dataset(out_dir)
    out = OutLayout(dataset.out_dir)
    report_dir = fsio.make_dirs(out.report)
    generation_outputs = dataset.outputs
    if judge is not None:
        judged = report_dir / layout.REPORT_JUDGE_OUTPUTS
        dataset.outputs = write_judge_outputs(dataset, judge, judged, block)
    figures = compute_figures(
        dataset.outputs,
        # targets live in the generation recognizer's space: with a judge the to-target
        # figures are recomputed below from the run's own embeddings
        dataset.targets if judge is None else dataset.outputs,
        dataset.codes,
        dataset.identities,
        labels=dataset.labels,
        keys=dataset.keys,
        collision_threshold=collision_threshold,
        duplicate_threshold=duplicate_threshold,
        block=block,
    )
    report = figures.figures
    if judge is not None:
        to_target = metrics.rowwise_cosine(generation_outputs, dataset.targets, block=block)
        report["consistency"]["image_to_target"] = distribution(to_target)
        for key in ("identity_mean_to_target", "identity_min_to_target"):
            report["consistency"][key] = None
        report["consistency"]["note"] = (
            "image_to_target uses the generation recognizer (targets are in its space); "
            "every other figure uses the judge"
        )
        report["judge"] = {"recognizer": judge_name, "embeddings": layout.REPORT_JUDGE_OUTPUTS}
    report["counts"]["rejected"] = count_rows(out.rejected)
    report["counts"]["errors"] = count_rows(out.errors)
    report["thresholds"]["leak"] = leak_threshold
    report["leakage"] = None
    if gallery is not None:
        gallery = location(gallery)  # a path or a URL
        report["leakage"] = leakage_figures(
            dataset.outputs,
            dataset.codes,
            dataset.identities,
            load_gallery(gallery, gallery_embedder),
            leak_threshold,
            labels=dataset.labels,
            keys=dataset.keys,
            centroids=figures.centroids,
            gallery_name=gallery.name,
            block=block,
        )
    plot_histogram(
        figures, report_dir / layout.REPORT_HISTOGRAM, collision_threshold=collision_threshold
    )
    sheets = contact_sheets(
        dataset, figures, report_dir, identities=contact_identities, per_sheet=identities_per_sheet
    )
    report["histogram_png"] = layout.REPORT_HISTOGRAM
    report["contact_sheets"] = [path.name for path in sheets]
    if pose is not None:
        report["pose"], samples = pose_figures(dataset, pose, per_identity=pose_per_identity)
        report["pose_png"] = plot_pose(samples, report_dir / layout.REPORT_POSE).name
    _write_json(out.report_json, report)
    if html:
        write_html(report, report_dir, embed_images=embed_images)
    logger.info("report written to %s", report_dir)
    return report


def load_report(out_dir: str | Path) -> dict[str, Any]:
    path = OutLayout(out_dir).report_json
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `digi2real report {out_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def run_report(
    out: Path | None,
    *,
    gallery: Path | None,
    html: bool,
    source: Path | None,
    config: Config | None,
    thresholds: dict[str, float] | None = None,
    embed_images: bool = False,
    pose: bool = False,
) -> str:
    """``digi2real report``: a converted dataset's report (and a refreshed dataset card), or
    with ``source`` the separation check of a source dataset before any GPU time."""
    from digi2real.analysis.card import write_card

    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    if source is not None:
        if source.suffix == ".npy":
            data = load_embeddings(source, mmap=True)
        else:
            if config is None or config.weights is None:
                raise ValueError("report --source on images needs weights (--weights DIR)")
            data = gallery_embedder(config)(source)
        if data.identities is None:
            raise ValueError(f"{source}: identities unknown (no rows file beside it)")
        threshold = thresholds.get("collision_threshold", DEFAULT_COLLISION_THRESHOLD)
        result = source_report(np.asarray(data.embeddings), data.identities, threshold)
        return format_source(result, threshold)
    if out is None:
        raise ValueError("report needs a converted dataset OUT (or --source SRC)")
    embedder = (
        gallery_embedder(config)
        if (gallery is not None and config is not None and config.weights)
        else None
    )
    judge = judge_embedder(config) if config is not None else None
    landmarks = None
    if pose:
        if config is None or config.weights is None:
            raise ValueError("report --pose needs weights (--weights DIR): it runs the detector")
        from digi2real.face.stack import FaceStack

        landmarks = detector_landmarks(FaceStack.from_config(config).detector)
    result = build_report(
        out,
        gallery=gallery,
        gallery_embedder=embedder,
        html=html,
        embed_images=embed_images,
        judge=judge,
        judge_name=config.report.recognizer if config is not None and judge else None,
        pose=landmarks,
        **thresholds,
    )
    write_card(out)
    return format_report(result, Path(out))
