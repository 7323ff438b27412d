"""The report's attribute section on a hand-built OUT (no models): sources vs outputs per
attribute, --balance achieved, label fidelity, its pictures, HTML, CLI lines and --compare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_report import NAMES, SyntheticOut, make_synthetic_out

import digi2real.analysis.report as report_module
from digi2real.analysis.report import build_report
from digi2real.analysis.report.compare import compare_runs, format_compare
from digi2real.analysis.report.summary import format_report
from digi2real.data import attributes as attrs
from digi2real.data import layout

EDGES = (-60.0, -20.0, 20.0, 60.0)  # yaw bins: [-60, -20), [-20, 20), [20, 60]
RENDER_YAW = (-40.0, 0.0, 40.0)  # renders 0, 1, 2 of an identity: one per bin
NO_BIN_2 = "id_03"  # its render 2 has yaw 10: it has no render in the last bin
REJECTED = "id_04"  # two targets (both from render 2) rejected: its outputs miss bin 2
HOSTILE_WHERE = "yaw > -90 and hair != '<script>alert(1)</script>'"


def _render_yaw(name: str, render: int) -> float:
    if name == NO_BIN_2 and render == 2:
        return 10.0
    return RENDER_YAW[render] + NAMES.index(name) * 0.5


def _landmarks(rng: np.random.Generator) -> list[list[float]]:
    return rng.uniform(8, 56, (70, 2)).round(3).tolist()


def add_attributes(synthetic: SyntheticOut, *, estimates: bool = True) -> dict:
    """Turn the synthetic OUT into one that carried attributes (yaw balanced over 3 bins,
    geometry kept); return what the test computes its expectations from."""
    rng = np.random.default_rng(7)
    out = synthetic.out
    manifest = pq.read_table(out / "manifest.parquet")
    rows = manifest.to_pylist()
    renders = [f"{name}/{n}.png" for name in NAMES for n in range(3)]
    truth = {
        path: {
            "yaw": _render_yaw(path.split("/")[0], int(path[-5])),
            "pitch": float(rng.uniform(-20, 20)),
            "age": int(rng.integers(20, 70)),
            "hair": ["short", "long", "<b>bald</b>"][int(path[-5])],
        }
        for path in renders
    }
    source = attrs.SourceAttributes(
        columns={
            "age": pa.int64(),
            "hair": pa.string(),
            "pitch": pa.float64(),
            "yaw": pa.float64(),
        },
        rows=truth,
        landmarks={path: np.asarray(_landmarks(rng)) for path in renders},
        origin="synthface+table",
        counts={"rows": len(renders), "matched": len(renders)},
    )
    table = source.to_table()
    meta = json.loads(table.schema.metadata[b"digi2real"])
    meta["edges"] = list(EDGES)
    pq.write_table(
        table.replace_schema_metadata({"digi2real": json.dumps(meta)}),
        out / ".digi2real" / "attributes.parquet",
    )
    source_estimates = {path: float(truth[path]["yaw"] + rng.normal(0, 3)) for path in renders}
    if estimates:
        (out / ".digi2real" / "cache").mkdir()
        pq.write_table(
            pa.table(
                {
                    "path": renders,
                    **{
                        name: [
                            source_estimates[p] if name == "yaw_est" else float(rng.uniform(0, 9))
                            for p in renders
                        ]
                        for name in attrs.ESTIMATES
                    },
                }
            ),
            out / ".digi2real" / "cache" / "shard-000000-estimates.parquet",
        )
    rejected = []
    for row in rows:
        name, k = row["identity"], row["index"]
        render = k % 3
        if name == REJECTED:
            render = (0, 1, 0, 1)[k]
        dominant = f"{name}/{render}.png"
        row["source_paths"] = [dominant, f"{name}/{(render + 1) % 3}.png"]
        for column in ("age", "hair", "pitch", "yaw"):
            row[column] = truth[dominant][column]
        if estimates:
            for name_est in attrs.ESTIMATES:
                row[name_est] = source_estimates[dominant] if name_est == "yaw_est" else 1.0
        row[attrs.ATTRIBUTES_FROM] = dominant
        row[attrs.LANDMARKS] = _landmarks(rng)
        row[attrs.LABEL_MATRIX] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        row[attrs.NME] = float(rng.uniform(1, 14))
        row[attrs.OUTPUT_YAW] = float(row["yaw"] * 0.9 + rng.normal(0, 4))
        row[attrs.OUTPUT_PITCH] = float(row["pitch"] + rng.normal(0, 2))
    for position in (3, 17):  # no face found on these outputs
        rows[position][attrs.NME] = None
        rows[position][attrs.OUTPUT_YAW] = rows[position][attrs.OUTPUT_PITCH] = None
    rows[9][attrs.LANDMARKS] = None  # its render had no landmarks
    rows[9][attrs.NME] = None
    for k in (4, 5):
        rejected.append(
            {
                "identity": REJECTED,
                "index": k,
                "attempts": 3,
                "seeds": [1, 2, 3],
                "best_similarity": 0.1,
                "reason": "below threshold",
                "interp_kind": "slerp",
                "source_paths": [f"{REJECTED}/0.png", f"{REJECTED}/2.png"],
                "interp_weights": [0.3, 0.7],  # render 2 dominates
                "shard": 0,
            }
        )
    fields = [
        pa.field("age", pa.int64()),
        pa.field("hair", pa.string()),
        pa.field("pitch", pa.float64()),
        pa.field("yaw", pa.float64()),
        *([pa.field(n, pa.float64()) for n in attrs.ESTIMATES] if estimates else []),
        pa.field(attrs.ATTRIBUTES_FROM, pa.string()),
        pa.field(attrs.LANDMARKS, pa.list_(pa.list_(pa.float64(), 2))),
        pa.field(attrs.LABEL_MATRIX, pa.list_(pa.float64(), 6)),
        pa.field(attrs.NME, pa.float64()),
        pa.field(attrs.OUTPUT_YAW, pa.float64()),
        pa.field(attrs.OUTPUT_PITCH, pa.float64()),
    ]
    schema = pa.schema([*manifest.schema, *fields])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rejected), out / "rejected.parquet")
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["attributes"] = {
        "origin": "synthface+table",
        "columns": [f.name for f in fields],
        "geometry": True,
        "where": HOSTILE_WHERE,
        "balance": "yaw:-60,-20,20,60",
        "edges": list(EDGES),
        "table": {"rows": len(renders), "matched": len(renders)},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return {"rows": rows, "truth": truth, "source_estimates": source_estimates}


@pytest.fixture()
def carried(tmp_path: Path) -> tuple[SyntheticOut, dict]:
    synthetic = make_synthetic_out(tmp_path)
    return synthetic, add_attributes(synthetic)


def test_attribute_distributions_sources_vs_outputs(carried) -> None:
    synthetic, made = carried
    section = build_report(synthetic.out)["attributes"]
    assert section["columns"] == ["age", "hair", "pitch", "yaw", *attrs.ESTIMATES]
    assert list(section["numeric"]) == ["age", "pitch", "yaw", *attrs.ESTIMATES]
    assert section["not_summarised"] == ["hair"]
    assert section["where"] == HOSTILE_WHERE and section["origin"] == "synthface+table"

    yaw = section["numeric"]["yaw"]
    assert yaw["kind"] == "ground truth"
    sources = np.array([v["yaw"] for v in made["truth"].values()])
    outputs = np.array([row["yaw"] for row in made["rows"]])
    for side, values in (("sources", sources), ("outputs", outputs)):
        assert yaw[side]["count"] == len(values) and yaw[side]["missing"] == 0
        assert yaw[side]["mean"] == pytest.approx(values.mean(), abs=1e-6)
        assert yaw[side]["std"] == pytest.approx(values.std(), abs=1e-6)
        assert (yaw[side]["min"], yaw[side]["max"]) == pytest.approx(
            (values.min(), values.max()), abs=1e-6
        )
    edges = np.linspace(min(sources.min(), outputs.min()), max(sources.max(), outputs.max()), 21)
    assert yaw["histogram"]["edges"] == pytest.approx(edges, abs=1e-6)
    assert yaw["histogram"]["sources"] == np.histogram(sources, edges)[0].tolist()
    assert yaw["histogram"]["outputs"] == np.histogram(outputs, edges)[0].tolist()

    estimate = section["numeric"]["yaw_est"]
    assert estimate["kind"] == "estimate"
    cached = np.array(list(made["source_estimates"].values()))
    assert estimate["sources"]["count"] == len(cached)
    assert estimate["sources"]["mean"] == pytest.approx(cached.mean(), abs=1e-6)


def test_balance_requested_vs_achieved(carried) -> None:
    synthetic, made = carried
    balance = build_report(synthetic.out)["attributes"]["balance"]
    assert balance["column"] == "yaw" and balance["spec"] == "yaw:-60,-20,20,60"
    labels = attrs.bin_labels(EDGES)
    bins = np.digitize([row["yaw"] for row in made["rows"]], EDGES[1:-1])
    expected = [int((bins == b).sum()) for b in range(3)]
    assert [b["bin"] for b in balance["bins"]] == labels
    assert [b["outputs"] for b in balance["bins"]] == expected
    assert [b["requested_share"] for b in balance["bins"]] == [pytest.approx(1 / 3, abs=1e-6)] * 3
    assert sum(b["share"] for b in balance["bins"]) == pytest.approx(1.0, abs=1e-5)
    assert balance["outside_bins"] == 0
    # every identity has 4 outputs over its renders 0,1,2,0 -> (2, 1, 1), but for these two
    assert balance["identities"] == len(NAMES)
    assert balance["uneven_identities"] == 2
    assert balance["uneven_reasons"] == {
        "no_render_in_a_bin": 1,
        "rejected_targets": 1,
        "unexplained": 0,
    }
    by_name = {e["identity"]: e for e in balance["uneven_examples"]}
    assert by_name[NO_BIN_2]["outputs"] == [2, 2, 0] and by_name[NO_BIN_2]["rejected"] == 0
    assert by_name[REJECTED]["outputs"] == [2, 2, 0]
    assert by_name[REJECTED]["planned"] == [2, 2, 2] and by_name[REJECTED]["rejected"] == 2

    # a rejected.parquet without the targets' renders: the uneven identities, but not why
    pq.write_table(
        pa.table({"identity": [REJECTED], "reason": ["below threshold"]}),
        synthetic.out / "rejected.parquet",
    )
    balance = build_report(synthetic.out)["attributes"]["balance"]
    assert balance["uneven_identities"] == 2 and balance["uneven_reasons"] is None
    assert balance["rejected_known"] is False


def test_label_fidelity_figures(carried) -> None:
    synthetic, made = carried
    fidelity = build_report(synthetic.out)["attributes"]["label_fidelity"]
    nme = np.array([r[attrs.NME] for r in made["rows"] if r[attrs.NME] is not None])
    figures = fidelity["nme"]
    assert figures["count"] == len(nme) == len(made["rows"]) - 3
    assert figures["missing"] == 3
    assert figures["mean"] == pytest.approx(nme.mean(), abs=1e-6)
    assert figures["median"] == pytest.approx(np.median(nme), abs=1e-6)
    assert figures["p90"] == pytest.approx(np.percentile(nme, 90), abs=1e-6)
    assert figures["max"] == pytest.approx(nme.max(), abs=1e-6)
    assert figures["share_below_5"] == pytest.approx((nme < 5).mean(), abs=1e-6)
    assert figures["share_below_10"] == pytest.approx((nme < 10).mean(), abs=1e-6)

    for axis, measured in (("yaw", attrs.OUTPUT_YAW), ("pitch", attrs.OUTPUT_PITCH)):
        pairs = np.array([(r[measured], r[axis]) for r in made["rows"] if r[measured] is not None])
        pose = fidelity["pose"][axis]
        assert pose["reference"] == "ground truth" and pose["column"] == axis
        assert pose["count"] == len(pairs) == len(made["rows"]) - 2
        assert pose["mae"] == pytest.approx(np.abs(pairs[:, 0] - pairs[:, 1]).mean(), abs=1e-6)
        r = np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]
        assert pose["correlation"] == pytest.approx(r, abs=1e-6)
    assert "not" in fidelity["cannot_tell"] and "five points" in fidelity["cannot_tell"]


def test_pictures_html_summary_and_compare(carried, tmp_path: Path) -> None:
    synthetic, _ = carried
    report = build_report(synthetic.out, html=True)
    folder = synthetic.out / "report"
    section = report["attributes"]
    assert section["png"] == "attributes.png"
    assert section["landmark_sheets"] == ["landmarks_000.png"]
    for name in ["attributes.png", "landmarks_000.png"]:
        assert layout.is_owned_name(f"report/{name}", ())
        assert not layout.is_owned_name(f"report/x_{name}", ())
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 300
    with Image.open(folder / "landmarks_000.png") as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 120) & (pixels[..., 2] < 120)
    cyan = (pixels[..., 0] < 60) & (pixels[..., 1] > 180) & (pixels[..., 2] > 200)
    assert green.sum() > 100 and cyan.sum() > 10  # iBUG dots and pupils drawn

    page = (folder / "index.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "src='attributes.png'" in page and "src='landmarks_000.png'" in page

    text = format_report(report, synthetic.out)
    assert "attributes carried (synthface+table): age, hair, pitch, yaw" in text
    assert "label fidelity: NME median" in text and "yaw MAE" in text
    assert "balance yaw:-60,-20,20,60: outputs per bin" in text

    other = tmp_path / "other" / "OUT"
    shutil.copytree(synthetic.out, other)
    manifest = pq.read_table(other / "manifest.parquet")
    nme = pa.array([None if v is None else v * 2 for v in manifest[attrs.NME].to_pylist()])
    manifest = manifest.set_column(manifest.schema.get_field_index(attrs.NME), attrs.NME, nme)
    pq.write_table(manifest, other / "manifest.parquet")
    second = build_report(other)
    result = compare_runs([synthetic.out, other], [report, second])
    figures = {f["figure"]: f["values"] for f in result["figures"]}
    medians = figures["label fidelity: median NME (% inter-pupil)"]
    assert medians[1] == pytest.approx(2 * medians[0], abs=1e-5)
    assert (
        figures["label fidelity: yaw MAE (degrees)"][0]
        == section["label_fidelity"]["pose"]["yaw"]["mae"]
    )
    assert "label fidelity: median NME" in format_compare(result)


def test_estimates_only_run_compares_pose_with_the_estimate(tmp_path: Path) -> None:
    """A DigiFace-like run: no ground truth, no landmarks; estimates only."""
    synthetic = make_synthetic_out(tmp_path)
    rng = np.random.default_rng(3)
    manifest = pq.read_table(synthetic.out / "manifest.parquet")
    n = manifest.num_rows
    yaw_est = rng.uniform(-50, 50, n)
    measured = yaw_est + rng.normal(0, 5, n)
    columns = {name: pa.array(rng.uniform(0, 9, n)) for name in attrs.ESTIMATES}
    columns["yaw_est"] = pa.array(yaw_est)
    columns[attrs.ATTRIBUTES_FROM] = pa.array(["x.png"] * n)
    columns[attrs.OUTPUT_YAW] = pa.array(measured)
    columns[attrs.OUTPUT_PITCH] = pa.array([None] * n, pa.float64())
    for name, column in columns.items():
        manifest = manifest.append_column(name, column)
    pq.write_table(manifest, synthetic.out / "manifest.parquet")
    config = yaml.safe_load((synthetic.out / "config.yaml").read_text())
    config["attributes"] = {"origin": "none", "where": None, "balance": None, "edges": None}
    (synthetic.out / "config.yaml").write_text(yaml.safe_dump(config))

    section = build_report(synthetic.out, html=True)["attributes"]
    assert section["balance"] is None and section["landmark_sheets"] == []
    assert section["numeric"]["yaw_est"]["sources"] is None  # no estimate cache
    fidelity = section["label_fidelity"]
    assert fidelity["nme"] is None and list(fidelity["pose"]) == ["yaw", "pitch"]
    # no pitch measured on any output: the pair is there, with nothing to compare
    assert fidelity["pose"]["pitch"]["count"] == 0 and fidelity["pose"]["pitch"]["mae"] is None
    pose = fidelity["pose"]["yaw"]
    assert pose["reference"] == "estimate" and pose["column"] == "yaw_est"
    assert pose["mae"] == pytest.approx(np.abs(measured - yaw_est).mean(), abs=1e-6)
    assert not list((synthetic.out / "report").glob("landmarks_*.png"))


def test_run_without_attributes_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    synthetic = make_synthetic_out(tmp_path)
    report = build_report(synthetic.out, html=True)
    assert "attributes" not in report
    folder = synthetic.out / "report"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["contact_000.png", "contact_001.png", "contact_002.png", "contact_003.png"][
        : len(report["contact_sheets"])
    ] + ["index.html", "report.json", "similarity_hist.png"]
    first = (folder / "report.json").read_bytes()
    page = (folder / "index.html").read_text()
    assert "Attributes" not in page and "attributes" not in json.loads(first)
    assert "attributes carried" not in format_report(report, synthetic.out)
    # without the attribute code at all, the same bytes
    monkeypatch.setattr(report_module, "attribute_section", lambda *a, **k: None)
    build_report(synthetic.out, html=True)
    assert (folder / "report.json").read_bytes() == first
    assert (folder / "index.html").read_text() == page
