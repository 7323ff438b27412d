"""`digi2real report` on a real (tiny-profile) conversion, with and without a judge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from digi2real.cli import main


@pytest.fixture(scope="module")
def converted(tiny_config, tmp_path_factory):
    from digi2real.runner.convert import convert

    out = tmp_path_factory.mktemp("rep") / "out"
    config = tiny_config(**{"source.identities": "first:3", "generation.steps": 2})
    convert(config, out, progress=False)
    return out


def test_report_html_and_card(converted, capsys):
    assert main(["report", str(converted), "--html"]) == 0
    report = json.loads((converted / "report" / "report.json").read_text())
    assert report["counts"]["identities"] == 3 and report["counts"]["images"] == 12
    html = (converted / "report" / "index.html").read_text()
    assert "similarity_hist.png" in html and "contact_000.png" in html
    card = (converted / "DATASET_CARD.md").read_text()
    assert "Report headline" in card and "image to its target" in card
    assert "identity collisions" in capsys.readouterr().out


def test_report_with_a_stricter_judge(converted, tmp_path):
    from digi2real.weights.tiny_face import export_tiny_recognizer

    judge = export_tiny_recognizer(tmp_path / "judge.onnx", dim=24, seed=5)
    assert main(["report", str(converted), "--judge", str(judge), "--html"]) == 0
    report = json.loads((converted / "report" / "report.json").read_text())
    assert report["judge"]["recognizer"] == str(judge)
    judged = np.load(converted / "report" / "judge_outputs.npy")
    assert judged.shape == (12, 24)
    assert np.allclose(np.linalg.norm(judged, axis=1), 1, atol=1e-5)
    stored = np.load(converted / ".digi2real" / "outputs.npy")
    targets = np.load(converted / ".digi2real" / "targets.npy")
    assert (
        abs(
            report["consistency"]["image_to_target"]["mean"]
            - float((stored * targets).sum(1).mean())
        )
        < 1e-4
    )


def test_source_report_before_converting(tiny_weights, sample_dataset, capsys):
    assert (
        main(
            [
                "report",
                "--source",
                str(sample_dataset),
                "--weights",
                str(tiny_weights.root),
                "--preset",
                "tiny",
            ]
        )
        == 0
    )
    assert "near-duplicate identity pairs" in capsys.readouterr().out


@pytest.fixture(scope="module")
def gallery_npy(tmp_path_factory):
    """Stand-in 'real faces' in the tiny recognizer's space: unit rows around one direction."""
    from helpers import unit_rows

    from digi2real.data.embeddings import save_embeddings
    from digi2real.weights.configs import TINY_ID_DIM

    rows = unit_rows(40, TINY_ID_DIM, seed=3) + 2 * unit_rows(1, TINY_ID_DIM, seed=4)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return save_embeddings(tmp_path_factory.mktemp("gal") / "real.npy", rows)


def test_domain_gap_embeds_a_shard_whose_cache_is_gone(converted, gallery_npy, tiny_weights):
    argv = ["report", str(converted), "--gallery", str(gallery_npy), "--weights"]
    argv.append(str(tiny_weights.root))
    assert main(argv) == 0
    before = json.loads((converted / "report" / "report.json").read_text())["domain_gap"]
    cache = converted / ".digi2real" / "cache" / "shard-000001.parquet"
    kept = cache.read_bytes()
    cache.unlink()
    try:
        assert main(argv) == 0
    finally:
        cache.write_bytes(kept)
    after = json.loads((converted / "report" / "report.json").read_text())["domain_gap"]
    assert after["recognizer"]["reembedded_shards"] == 1
    assert before["recognizer"]["reembedded_shards"] == 0
    # the same renders through the same recognizer: the same population
    assert after["recognizer"]["sources"] == before["recognizer"]["sources"]
    assert after["recognizer"]["outputs"] == before["recognizer"]["outputs"]


def test_features_space_is_measured_and_cached(converted, tiny_weights, sample_dataset, tmp_path):
    from digi2real.weights.tiny_face import export_tiny_recognizer

    encoder = export_tiny_recognizer(tmp_path / "encoder.onnx", dim=24, seed=7)
    argv = [
        *("report", str(converted), "--gallery", str(sample_dataset)),
        *("--weights", str(tiny_weights.root), "--preset", "tiny", "--html"),
        *("--features", str(encoder), "--features-size", "112"),
        *("--features-mean", "127.5,127.5,127.5", "--features-std", "127.5,127.5,127.5"),
    ]
    assert main(argv) == 0
    report_dir = converted / "report"
    first = json.loads((report_dir / "report.json").read_text())["domain_gap"]["features"]
    assert first["dim"] == 24 and first["cached"] == [] and first["model"] == "encoder.onnx"
    assert first["outputs"]["count"] == 12 and first["gallery"]["count"] == 24
    assert first["sources"]["count"] > 0 and first["outputs"]["fd"] > 0
    assert (report_dir / "domain_gap_features.png").is_file()
    assert "encoder.onnx features" in (report_dir / "index.html").read_text()
    assert main(argv) == 0  # read back, not recomputed: the same figures
    second = json.loads((report_dir / "report.json").read_text())["domain_gap"]["features"]
    assert sorted(second["cached"]) == ["gallery", "outputs", "sources"]
    assert {k: v for k, v in second.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    # another encoder (or preprocessing) is another space: nothing is read back
    export_tiny_recognizer(encoder, dim=24, seed=8)
    assert main(argv) == 0
    third = json.loads((report_dir / "report.json").read_text())["domain_gap"]["features"]
    assert third["cached"] == [] and third["outputs"]["fd"] != first["outputs"]["fd"]
    without_gallery = [a for a in argv if a not in ("--gallery", str(sample_dataset))]
    assert main(without_gallery) == 2  # --features measures against a gallery


def test_compare_names_the_field_that_differs(converted, tiny_config, tmp_path, capsys):
    from digi2real.runner.convert import convert

    other = tmp_path / "alpha"
    config = tiny_config(
        **{"source.identities": "first:3", "generation.steps": 2, "shift.alpha": 0.5}
    )
    convert(config, other, progress=False)
    dest = tmp_path / "cmp"
    argv = ["report", "--compare", str(converted), str(other), "--compare-out", str(dest)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((dest / "compare.json").read_text())
    assert [d["field"] for d in result["differences"]] == ["shift.alpha"]
    assert result["differences"][0]["values"] == [0.0, 0.5]
    assert [run["name"] for run in result["runs"]] == ["out", "alpha"]
    figures = {f["figure"]: f["values"] for f in result["figures"]}
    assert figures["images"] == [12, 12] and figures["acceptance rate"] == [1.0, 1.0]
    assert len(figures["identity collisions"]) == 2
    assert "shift.alpha" in printed and "out" in printed and "alpha" in printed
    html = (dest / "compare.html").read_text()
    assert "shift.alpha" in html and "<th>alpha</th>" in html
    assert main(["report", "--compare", str(converted)]) == 2  # one run is no comparison


def test_demo_report_tells_the_truth(tiny_weights, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--weights", str(tiny_weights.root)]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["counts"]["identities"] == 6
    # six distinct identities: none collides with another
    assert report["separation"]["num_collisions"] == 0
    assert report["separation"]["nearest_other"]["max"] < 0.6
    assert "noise" in report["notice"]
    assert report["notice"] in (out / "report" / "index.html").read_text().replace("&#x27;", "'")
    assert "Its images are noise" in (out / "DATASET_CARD.md").read_text()
