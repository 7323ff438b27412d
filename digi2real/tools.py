"""What the CLI's non-convert commands do: embed a dataset, domain-shift statistics, report,
prune, demo. Each is a plain function over the library (the CLI only maps flags)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import Config
from digi2real.data.embeddings import EmbeddingSet, load_embeddings, save_embeddings
from digi2real.data.images import ImageError, load_image
from digi2real.data.readers import IMAGE_EXTENSIONS, IdentitySelection, scan_dataset
from digi2real.sample import digiface_root

logger = logging.getLogger(__name__)


def _face_stack(config: Config) -> Any:
    from digi2real.runner.engine import FaceStack
    from digi2real.weights import open_weights

    if config.weights is None:
        raise ValueError("no weights: pass --weights DIR")
    return FaceStack(config, open_weights(config.weights), device=config.run.device)


def _embed_files(
    faces: Any, files: list[Path], root: Path, batch: int = 64
) -> Iterator[tuple[list[str], np.ndarray, list[tuple[str, str]]]]:
    """(paths, embeddings, errors) per batch of usable images."""
    crops: list[np.ndarray] = []
    names: list[str] = []
    errors: list[tuple[str, str]] = []
    for path in files:
        rel = os.path.relpath(path, root)
        try:
            image = load_image(path)
        except ImageError as error:
            errors.append((rel, error.reason))
            continue
        crop, why = faces.align(image)
        if crop is None:
            errors.append((rel, why))
            continue
        crops.append(crop)
        names.append(rel)
        if len(crops) == batch:
            yield names, faces.embed(np.stack(crops)), errors
            crops, names, errors = [], [], []
    if crops or errors:
        yield (
            names,
            (faces.embed(np.stack(crops)) if crops else np.zeros((0, faces.id_dim), np.float32)),
            errors,
        )


def embed_dataset(config: Config, src: Path, out: Path) -> dict[str, int]:
    """``digi2real embed``: every usable image of an identity dataset -> ``out`` (.npy + rows)."""
    faces = _face_stack(config)
    sources, scan_errors = scan_dataset(
        src, select=IdentitySelection.from_spec(config.source.identities)
    )
    embeddings, identities, paths = [], [], []
    errors = len(scan_errors)
    for source in sources:
        for names, batch, bad in _embed_files(faces, source.files, Path(src)):
            embeddings.append(batch)
            identities.extend([source.name] * len(names))
            paths.extend(names)
            errors += len(bad)
            for rel, reason in bad:
                logger.warning("skipped %s: %s", rel, reason)
    if not identities:
        raise ValueError(f"no usable face images in {src}")
    save_embeddings(out, np.concatenate(embeddings), identities=identities, paths=paths)
    return {"embedded": len(identities), "errors": errors}


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (any depth, e.g. FFHQ's numbered subfolders), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return found


def embedding_source(config: Config, src: Path) -> Iterator[np.ndarray]:
    """Batches of unit embeddings from a .npy file or a folder of face images."""
    from digi2real.domain_shift import embedding_batches

    if src.suffix == ".npy":
        yield from embedding_batches(load_embeddings(src, mmap=True).embeddings, 256)
        return
    if not src.is_dir():
        raise FileNotFoundError(f"not a folder of images or a .npy file: {src}")
    faces = _face_stack(config)
    for _names, batch, bad in _embed_files(faces, image_files(src), src):
        for rel, reason in bad:
            logger.warning("skipped %s: %s", rel, reason)
        if len(batch):
            yield batch


def compute_stats_for(config: Config, src: Path, kind: str, out: Path) -> Any:
    """``digi2real stats real|synthetic``."""
    from digi2real.conditioning import IdentityEncoder
    from digi2real.domain_shift import compute_stats
    from digi2real.weights import open_weights

    if config.weights is None:
        raise ValueError("no weights: pass --weights DIR")
    weights = open_weights(config.weights)
    faces = _face_stack(config)
    encoder = IdentityEncoder.from_weights(weights, id_dim=faces.id_dim, device=faces.device)
    stats = compute_stats(
        embedding_source(config, Path(src)),
        encoder.encode,
        kind=kind,
        encoder_digest=encoder.digest,
        source=str(src),
        created_by=shlex.join(["digi2real", *sys.argv[1:]]),
    )
    stats.save(out)
    return stats


def compare_stats(
    real: Path, synthetic: Path, *, method: str, alpha: float, positions: str, png: Path | None
) -> str:
    from digi2real.domain_shift import DomainShift, compare, format_compare, load_stats

    real_stats = load_stats(real, expected_kind="real")
    synth_stats = load_stats(
        synthetic,
        expected_kind="synthetic",
        expected_encoder_digest=real_stats.meta["encoder_digest"],
    )
    shift = DomainShift(method, alpha, positions, real_stats, synth_stats)
    result = compare(real_stats, synth_stats, shift=shift, out_png=png)
    text = format_compare(result)
    if png is not None:
        text += f"\nplot: {png}"
    return text


def gallery_embedder(config: Config):  # noqa: ANN201 - callable for report
    def embed(folder: Path) -> EmbeddingSet:
        faces = _face_stack(config)
        sources, _ = scan_dataset(folder)
        embeddings, identities, paths = [], [], []
        if sources:
            for source in sources:
                for names, batch, _bad in _embed_files(faces, source.files, folder):
                    embeddings.append(batch)
                    identities.extend([source.name] * len(names))
                    paths.extend(names)
        else:  # a flat folder: one identity per image
            for names, batch, _bad in _embed_files(faces, image_files(folder), folder):
                embeddings.append(batch)
                identities.extend(names)
                paths.extend(names)
        if not identities:
            raise ValueError(f"no usable face images in gallery {folder}")
        return EmbeddingSet(np.concatenate(embeddings), identities, paths)

    return embed


def judge_embedder(config: Config):  # noqa: ANN201 - callable for report
    """The report's stricter recognizer (``report.recognizer`` in the config), or None."""
    from digi2real.face import FaceEmbedder, RecognizerSpec

    section = config.report
    if section.recognizer is None:
        return None
    path = Path(section.recognizer)
    spec = RecognizerSpec(
        file=path.name,
        input_size=section.input_size,
        color=section.color,
        mean=tuple(section.mean),
        std=tuple(section.std),
    )
    embedder = FaceEmbedder(
        spec, path, device=config.run.device if config.run.device != "auto" else "cpu"
    )

    def embed(paths: list[Path]) -> np.ndarray:
        crops = []
        for image_path in paths:
            image = load_image(image_path)
            if image.shape[:2] != (section.input_size, section.input_size):
                from PIL import Image

                image = np.asarray(
                    Image.fromarray(image).resize((section.input_size,) * 2, Image.BICUBIC)
                )
            crops.append(image)
        return embedder.embed(np.stack(crops))

    return embed


def run_report(
    out: Path | None,
    *,
    gallery: Path | None,
    html: bool,
    source: Path | None,
    config: Config | None,
    thresholds: dict[str, float] | None = None,
    embed_images: bool = False,
) -> str:
    """``digi2real report``: a converted dataset's report (and a refreshed dataset card), or
    with ``source`` the separation check of a source dataset before any GPU time."""
    from digi2real import report
    from digi2real.runner.finalize import write_card

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
        threshold = thresholds.get("collision_threshold", report.DEFAULT_COLLISION_THRESHOLD)
        result = report.source_report(np.asarray(data.embeddings), data.identities, threshold)
        return _format_source(result, threshold)
    if out is None:
        raise ValueError("report needs a converted dataset OUT (or --source SRC)")
    embedder = (
        gallery_embedder(config)
        if (gallery is not None and config is not None and config.weights)
        else None
    )
    judge = judge_embedder(config) if config is not None else None
    result = report.build_report(
        out,
        gallery=gallery,
        gallery_embedder=embedder,
        html=html,
        embed_images=embed_images,
        judge=judge,
        judge_name=config.report.recognizer if config is not None and judge else None,
        **thresholds,
    )
    write_card(out)
    return _format_report(result, Path(out))


def _format_source(result: dict[str, Any], threshold: float) -> str:
    lines = [
        f"source identities: {result['identities']}, images: {result['images']}",
        f"near-duplicate identity pairs (centroid cosine >= {threshold}): {result['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in result["collisions"][:20]]
    if result["num_collisions"]:
        lines.append("these would be label noise after conversion: drop or merge them first")
    return "\n".join(lines)


def _format_report(result: dict[str, Any], out: Path) -> str:
    counts = result["counts"]
    consistency = result["consistency"]["image_to_target"]
    separation = result["separation"]
    leakage = result.get("leakage")
    lines = [
        f"images: {counts['images']} in {counts['identities']} identities",
        f"image-to-target cosine: mean {consistency.get('mean')}, min {consistency.get('min')}",
        f"identity collisions: {separation['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in separation["collisions"][:10]]
    if leakage is not None:
        lines.append(f"leaks against the gallery: {len(leakage['leaks'])}")
    lines.append(f"report: {out / 'report'}")
    return "\n".join(lines)


def run_prune(
    out: Path,
    dest: Path,
    drop_collisions: bool,
    drop_leaks: bool,
    keys_only: bool,
    copy: bool = False,
) -> str:
    """``digi2real prune``: a cleaned copy (or kept keys), formats and card rebuilt there."""
    import yaml

    from digi2real import report
    from digi2real.prune import prune
    from digi2real.runner.finalize import assemble_formats, write_card

    if not (Path(out) / "report" / "report.json").is_file():
        report.build_report(out)  # the drop lists come from the report's figures
    table = prune(
        out,
        dest,
        drop_collisions=drop_collisions,
        drop_leaks=drop_leaks,
        keys_only=keys_only,
        link=not copy,
    )
    if keys_only:
        return f"{table.num_rows} kept keys -> {Path(dest) / 'kept_keys.txt'}"
    record = yaml.safe_load((Path(dest) / "config.yaml").read_text(encoding="utf-8"))
    assemble_formats(Path(dest), record["config"]["output"]["formats"], table)
    write_card(Path(dest))
    identities = len(set(table.column("identity").to_pylist()))
    return f"kept {table.num_rows} images of {identities} identities -> {dest}"


def run_demo(out: Path, *, weights: Path | None = None, quiet: bool = False) -> list[str]:
    """Tiny profile (built if absent) on the bundled sample, then its report with contact
    sheets of the source renders beside their outputs."""
    import time

    from digi2real import report
    from digi2real.runner.convert import convert
    from digi2real.runner.finalize import write_card
    from digi2real.weights import ensure_tiny

    start = time.perf_counter()
    tiny = ensure_tiny(weights)
    config = Config.preset_named("tiny").override(
        {
            "weights": str(tiny.root),
            "source.root": str(digiface_root()),
            "source.license": "digi2real bundled sample (Apache-2.0, drawn by scripts/make_sample.py)",
        }
    )
    summary = convert(config, out, overwrite=True, progress=not quiet)
    report.build_report(out, html=True)
    write_card(out)
    sheets = sorted((Path(out) / "report").glob("contact_*.png"))
    return [
        f"demo finished in {time.perf_counter() - start:.1f}s",
        *summary.lines(),
        f"contact sheet:     {sheets[0] if sheets else '(none)'}",
        f"report:            {Path(out) / 'report' / 'index.html'}",
        f"dataset card:      {Path(out) / 'DATASET_CARD.md'}",
    ]
