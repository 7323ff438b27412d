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

logger = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).with_name("sample") / "digiface"


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


def run_report(
    out: Path | None,
    *,
    gallery: Path | None,
    html: bool,
    source: Path | None,
    config: Config | None,
) -> str:
    from digi2real import report

    if source is not None:
        if config is None:
            raise ValueError("report --source needs weights (--weights DIR) to embed the source")
        if source.suffix == ".npy":
            data = load_embeddings(source)
        else:
            data = gallery_embedder(config)(source)
        result = report.source_report(
            data.embeddings, data.identities, threshold=report.DEFAULT_COLLISION_THRESHOLD
        )
        return report.format_source_report(result)
    if out is None:
        raise ValueError("report needs a converted dataset OUT (or --source SRC)")
    embedder = gallery_embedder(config) if (gallery is not None and config is not None) else None
    result = report.build_report(out, gallery=gallery, gallery_embedder=embedder, html=html)
    return report.format_report(result, out)


def run_prune(
    out: Path, dest: Path, drop_collisions: bool, drop_leaks: bool, keys_only: bool
) -> str:
    from digi2real.prune import prune

    result = prune(
        out, dest, drop_collisions=drop_collisions, drop_leaks=drop_leaks, keys_only=keys_only
    )
    return str(result)


def run_demo(out: Path, *, weights: Path | None = None, quiet: bool = False) -> list[str]:
    """Tiny profile (built if absent) on the bundled sample, plus a contact sheet."""
    import time

    from digi2real.runner.convert import convert
    from digi2real.weights import ensure_tiny

    start = time.perf_counter()
    tiny = ensure_tiny(weights)
    config = Config.preset_named("tiny").override(
        {
            "weights": str(tiny.root),
            "source.root": str(SAMPLE_DIR),
            "source.license": "digi2real sample (Apache-2.0, generated by scripts/make_sample.py)",
        }
    )
    summary = convert(config, out, overwrite=True, progress=not quiet)
    sheet = write_contact_sheet(out, Path(out) / "contact_sheet.png")
    lines = [
        f"demo finished in {time.perf_counter() - start:.1f}s",
        *summary.lines(),
        f"contact sheet:     {sheet}",
    ]
    return lines


def write_contact_sheet(
    out: Path, png: Path, *, max_identities: int = 8, max_images: int = 6
) -> Path:
    """One row per identity: its source renders, then its outputs."""
    import pyarrow.parquet as pq
    import yaml
    from PIL import Image, ImageDraw

    out = Path(out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    record = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    source_root = Path(record["config"]["source"]["root"])
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in manifest:
        rows.setdefault(row["identity"], []).append(row)
    identities = sorted(rows)[:max_identities]
    max_images = min(max_images, max((len(rows[i]) for i in identities), default=1))
    cell, gap, label_w = 112, 4, 0
    n_src = 3
    width = (n_src + max_images) * (cell + gap) + gap + cell // 2
    height = max(len(identities), 1) * (cell + gap) + gap + 20
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 4), "sources", fill=(0, 0, 0))
    draw.text(
        ((n_src) * (cell + gap) + cell // 2, 4), "generated (aligned 112x112)", fill=(0, 0, 0)
    )
    for r, identity in enumerate(identities):
        y = 20 + gap + r * (cell + gap)
        sources = sorted({p for row in rows[identity] for p in row["source_paths"]})[:n_src]
        for c, rel in enumerate(sources):
            try:
                image = Image.fromarray(load_image(source_root / rel)).resize((cell, cell))
            except (ImageError, FileNotFoundError, OSError):
                continue
            sheet.paste(image, (gap + c * (cell + gap) + label_w, y))
        for c, row in enumerate(rows[identity][:max_images]):
            with Image.open(out / row["path"]) as image:
                tile = image.convert("RGB").resize((cell, cell))
            x = gap + (n_src + c) * (cell + gap) + cell // 2
            sheet.paste(tile, (x, y))
            draw.text((x + 2, y + cell - 12), f"{row['similarity']:.2f}", fill=(255, 255, 0))
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return png
