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
