"""The dataset report: consistency, separation, leakage, diversity, pictures and HTML.

``build_report(OUT)`` reads a converted dataset (manifest + the row-aligned output/target
embedding arrays, memory-mapped) and writes ``OUT/report/``:

- ``report.json``: every figure (below), deterministic (no timestamps, rounded floats);
- ``similarity_hist.png``: image-to-own-centroid (intra) vs centroid-to-nearest-other
  (inter) cosine, plus output-to-target;
- ``contact_NNN.png``: per identity its source render(s) beside its realistic outputs;
- ``index.html`` (``html=True``): a page over all of it that opens from the folder;
- a run that carries per-image attributes: ``report.json["attributes"]`` (sources vs
  outputs per attribute, ``--balance`` achieved, label fidelity), ``attributes.png`` and
  ``landmarks_NNN.png`` (:mod:`.attributes`); any other run's report is unchanged.

Figures: *consistency* (each image's cosine to its identity centroid and to its own
target, per identity and over identities), *separation* (nearest other identity per
identity and the identity pairs whose centroids collide), *leakage* (generated
identities matching a gallery of real identities), *diversity* (mean pairwise cosine
distance per identity and near-duplicate images within an identity) and counts.

``source_report`` runs the separation check on a source dataset's embeddings before any
generation: near-duplicate source identities would become label noise.

Modules: :mod:`.dataset` reads OUT, :mod:`.figures` computes the numbers, :mod:`.pictures`
draws the histogram and contact sheets, :mod:`.html` writes the page, :mod:`.judge` holds
the gallery and judge recognizers, :mod:`.attributes` a run's attribute section,
:mod:`.summary` the text the CLI prints; this module puts them together. Every file is written through :mod:`digi2real.data.fsio`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real.analysis import metrics
from digi2real.analysis.report.attributes import attribute_section
from digi2real.analysis.report.compare import compare_runs, format_compare, write_compare
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
from digi2real.analysis.report.gap import GapOptions, features_gap, recognizer_gap
from digi2real.analysis.report.html import write_html
from digi2real.analysis.report.judge import (
    Judge,
    OnnxImages,
    embedded_blocks,
    features_embedder,
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
from digi2real.data.embeddings import EmbeddingSet, load_embeddings
from digi2real.data.layout import OutLayout
from digi2real.data.store import location

if TYPE_CHECKING:
    from digi2real.face import FaceStack

__all__ = [
    "DEFAULT_COLLISION_THRESHOLD",
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_LEAK_THRESHOLD",
    "HIST_BINS",
    "REPORT_FORMAT",
    "Dataset",
    "Figures",
    "GalleryEmbedder",
    "GapOptions",
    "Judge",
    "SheetRow",
    "build_report",
    "compute_figures",
    "contact_sheets",
    "compare_runs",
    "distribution",
    "domain_gap_figures",
    "draw_contact_sheet",
    "features_embedder",
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
    features: OnnxImages | None = None,
    faces: FaceStack | None = None,
    gap_options: GapOptions | None = None,
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
    With a gallery, the domain gap (:mod:`.gap`): Fréchet distance and KID of the source
    renders and of the outputs against it, in the run's recognizer space (``domain_gap.png``)
    and, with ``features`` (an image encoder), in that encoder's space
    (``domain_gap_features.png``). ``faces`` (the weights' face models) embeds the sources of a
    shard whose cache is gone, and aligns the gallery and the sources for ``features``.
    Returns the report dict written to report.json.
    """
    check_threshold("leak_threshold", leak_threshold)
    if contact_identities < 0 or identities_per_sheet < 1:
        raise ValueError(
            f"contact_identities must be >= 0 and identities_per_sheet >= 1, got "
            f"{contact_identities} and {identities_per_sheet}"
        )
    dataset = open_dataset(out_dir)
    # the inputs are read (and a bad one refused) before anything is written
    gallery = location(gallery) if gallery is not None else None  # a path or a URL
    real = load_gallery(gallery, gallery_embedder) if gallery is not None else None
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
    report["domain_gap"] = None
    if dataset.weights_profile == "tiny":
        report["notice"] = TINY_REPORT_NOTICE
    if gallery is not None and real is not None:
        report["leakage"] = leakage_figures(
            dataset.outputs,
            dataset.codes,
            dataset.identities,
            real,
            leak_threshold,
            labels=dataset.labels,
            keys=dataset.keys,
            centroids=figures.centroids,
            gallery_name=gallery.name,
            block=block,
        )
        report["domain_gap"] = domain_gap_figures(
            dataset,
            generation_outputs,
            real,
            gallery,
            report_dir,
            features=features,
            faces=faces,
            options=gap_options,
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
    attributes = attribute_section(dataset, report_dir)
    if attributes is not None:  # a run without attributes: no key, no file
        report["attributes"] = attributes
    _write_json(out.report_json, report)
    if html:
        write_html(report, report_dir, embed_images=embed_images)
    logger.info("report written to %s", report_dir)
    return report


TINY_REPORT_NOTICE = (
    "Made with the tiny weights profile: random weights. Its images are noise and its "
    "recognizer a random projection of pixels, so every figure here describes pixel "
    "similarity of noise images, not faces: the report shows the pipeline runs, nothing more."
)


def domain_gap_figures(
    dataset: Dataset,
    outputs: np.ndarray,
    gallery: EmbeddingSet,
    gallery_path: Path,
    report_dir: Path,
    *,
    features: OnnxImages | None = None,
    faces: FaceStack | None = None,
    options: GapOptions | None = None,
) -> dict[str, Any]:
    """The domain gap in the recognizer's space and, with ``features``, the encoder's."""
    reembed = None
    if faces is not None:
        stack = faces

        def reembed(paths: list[Path]) -> Iterator[np.ndarray]:
            return embedded_blocks(stack, paths)

    section: dict[str, Any] = {
        "recognizer": recognizer_gap(
            dataset,
            outputs,
            gallery,
            gallery_path.name,
            report_dir / layout.REPORT_DOMAIN_GAP,
            reembed=reembed,
            options=options,
        ),
        "features": None,
    }
    if features is not None:
        section["features"] = features_gap(
            dataset, features, gallery_path, faces, report_dir, options=options
        )
    return section


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
    features: OnnxImages | None = None,
    compare: list[Path] | None = None,
    compare_out: Path | None = None,
) -> str:
    """``digi2real report``: a converted dataset's report (and a refreshed dataset card), with
    ``source`` the separation check of a source dataset before any GPU time, or with
    ``compare`` several runs side by side (each reported first when it has no report yet, or
    when a gallery or features are given so every run is measured against the same)."""
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
    runs = list(compare or []) or ([] if out is None else [out])
    if not runs:
        raise ValueError("report needs a converted dataset OUT (or --source SRC, --compare A B)")
    if compare is not None and len(runs) < 2:
        raise ValueError(f"--compare needs at least two converted datasets, got {len(runs)}")
    if features is not None and gallery is None:
        raise ValueError("--features measures the domain gap to a gallery: pass --gallery FOLDER")
    has_weights = config is not None and config.weights is not None
    embedder = gallery_embedder(config) if (gallery is not None and has_weights) else None
    judge = judge_embedder(config) if config is not None else None
    faces = None
    if has_weights and (pose or (gallery is not None and Path(str(config.weights)).is_dir())):
        from digi2real.face.stack import FaceStack

        faces = FaceStack.from_config(config)  # type: ignore[arg-type]
    if pose and faces is None:
        raise ValueError("report --pose needs weights (--weights DIR): it runs the detector")
    landmarks = detector_landmarks(faces.detector) if pose and faces is not None else None
    reports = []
    for run in runs:
        if (
            compare is not None
            and OutLayout(run).report_json.is_file()
            and not (gallery or features or judge or pose)
        ):
            reports.append(load_report(run))
            continue
        reports.append(
            build_report(
                run,
                gallery=gallery,
                gallery_embedder=embedder,
                html=html,
                embed_images=embed_images,
                judge=judge,
                judge_name=config.report.recognizer if config is not None and judge else None,
                pose=landmarks,
                features=features,
                faces=faces,
                **thresholds,
            )
        )
        write_card(run)
    if compare is None:
        return format_report(reports[0], Path(runs[0]))
    result = compare_runs(runs, reports)
    dest = compare_out or OutLayout(runs[0]).report
    written = write_compare(result, Path(dest), embed_images=embed_images)
    return format_compare(result, written)
