"""The report's domain gap on a synthetic converted dataset with planted populations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from digi2real.analysis.report import GapOptions, build_report, domain_gap_figures, open_dataset
from digi2real.analysis.report.summary import format_report
from digi2real.data.embeddings import load_embeddings, save_embeddings
from digi2real.data.layout import OutLayout

DIM = 16
IDENTITIES = 12
PER_IDENTITY = 6
OPTIONS = GapOptions(kid_subsets=10, kid_subset_size=40)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def around(direction: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return _unit(direction[None, :] + 0.35 * rng.standard_normal((count, DIM)))


def make_out(root: Path) -> tuple[Path, Path]:
    """Gallery around e0; source renders around e1 (far); outputs between them (nearer e0)."""
    rng = np.random.default_rng(0)
    real, rendered = np.eye(DIM)[0], np.eye(DIM)[1]
    between = real * 0.8 + rendered * 0.2
    out = root / "OUT"
    paths = OutLayout(out)
    rows, plan = [], []
    for label in range(IDENTITIES):
        name = f"id_{label:02d}"
        plan.append(
            {"shard": label // 6, "identity": name, "files": [f"{name}/{n}.png" for n in range(5)]}
        )
        rows += [
            {
                "key": f"{label:07d}_{k:04d}",
                "identity": name,
                "label": label,
                "path": f"images/{name}/{k:04d}.jpg",
                "source_paths": [f"{name}/0.png"],
            }
            for k in range(PER_IDENTITY)
        ]
    paths.state.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), paths.manifest)
    outputs = around(between, len(rows), rng)
    np.save(paths.outputs, outputs)
    np.save(paths.targets, outputs)
    pq.write_table(pa.Table.from_pylist(plan), paths.plan)
    (paths.state / "cache").mkdir()
    for shard in (0, 1):
        cache = [
            {
                "identity": item["identity"],
                "path": f,
                "stage": "",
                "reason": "",
                "embedding": around(rendered, 1, rng)[0].astype(float).tolist(),
            }
            for item in plan
            if item["shard"] == shard
            for f in item["files"]
        ]
        cache[0].update(stage="detect", reason="no face", embedding=None)
        pq.write_table(pa.Table.from_pylist(cache), paths.cache(shard))
    gallery = save_embeddings(root / "gallery.npy", around(real, 150, rng))
    return out, gallery


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[Path, Path]:
    return make_out(tmp_path)


def test_gap_of_sources_and_outputs_against_the_gallery(planted: tuple[Path, Path]) -> None:
    out, gallery = planted
    report = build_report(out, gallery=gallery, html=True, gap_options=OPTIONS)
    gap = report["domain_gap"]["recognizer"]
    assert gap["gallery"]["count"] == 150 and gap["dim"] == DIM
    assert gap["sources"]["count"] == IDENTITIES * 5 - 2  # one unusable render per shard
    assert gap["outputs"]["count"] == IDENTITIES * PER_IDENTITY
    assert gap["sources"]["fd"] > gap["outputs"]["fd"] > 0
    assert gap["sources"]["kid"] > gap["outputs"]["kid"] > 0
    assert 0 < gap["gap_closed"]["fd"] < 1 and 0 < gap["gap_closed"]["kid"] < 1
    assert gap["missing_shards"] == 0 and gap["shards"] == 2
    paths = OutLayout(out)
    assert (paths.report / gap["png"]).stat().st_size > 1000
    html = (paths.report / "index.html").read_text()
    assert "Domain gap against real faces" in html and gap["png"] in html
    assert "domain gap (recognizer, vs 150 real faces)" in format_report(report, out)
    first = paths.report_json.read_bytes()
    build_report(out, gallery=gallery, html=True, gap_options=OPTIONS)
    assert paths.report_json.read_bytes() == first  # deterministic
    assert report["domain_gap"]["features"] is None


def test_a_shard_without_its_cache_is_left_out_and_said(planted: tuple[Path, Path]) -> None:
    out, gallery = planted
    OutLayout(out).cache(1).unlink()
    gap = build_report(out, gallery=gallery, gap_options=OPTIONS)["domain_gap"]["recognizer"]
    assert gap["missing_shards"] == 1 and gap["reembedded_shards"] == 0
    assert gap["sources"]["count"] == 6 * 5 - 1
    report = json.loads(OutLayout(out).report_json.read_text())
    assert report["domain_gap"]["recognizer"]["missing_shards"] == 1


def test_no_gallery_no_gap_and_a_gallery_of_another_width_is_said(
    planted: tuple[Path, Path], tmp_path: Path
) -> None:
    out, _ = planted
    assert build_report(out)["domain_gap"] is None
    # with a judge the gallery is in the judge's space, the sources in the run's: said, not mixed
    dataset = open_dataset(out)
    wide = load_embeddings(save_embeddings(tmp_path / "wide.npy", _unit(np.ones((4, 2 * DIM)))))
    gap = domain_gap_figures(dataset, dataset.outputs, wide, tmp_path / "wide.npy", tmp_path)
    assert "32-d" in gap["recognizer"]["skipped"] and "16-d" in gap["recognizer"]["skipped"]
