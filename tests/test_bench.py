"""scripts/bench.py on the tiny profile: both paths produce images, the table and the JSON
carry every measured quantity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [
        sys.executable,
        str(BENCH),
        "--profile=tiny",
        "--device=cpu",
        "--images=4",
        "--batch-sizes",
        "4",
        "--steps=4",
        "--threads=1",
        "--variant-batch=1",
        "--repeats=1",
        "--embed-arch=r18",
        "--embed-batch=2",
        "--embed-seconds=0.2",
        "--plan-images=1200",
        f"--json={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text(encoding="utf-8"))


def test_both_paths_produced_images(bench):
    _, report = bench
    produced = report["images_produced"]
    assert produced["naive"] == produced["engine"] == 4
    assert produced["naive_shape"] == produced["engine_shape"] == [64, 64, 3]
    naive, engine = report["paths"]
    assert naive["path"] == "naive" and naive["batch"] == 4
    assert engine["path"] == "engine b4" and engine["overlap"] is True


def test_measurements_are_consistent(bench):
    _, report = bench
    assert report["run"]["attention"] == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    flops = report["flops"]
    assert min(flops.values()) > 0
    assert report["flops_per_image"] == pytest.approx(
        2 * 4 * flops["unet_forward"] + flops["vae_decode"] + flops["encoder"]
    )
    assert report["peak"]["tflops"] > 0 and report["peak"]["dtype"] == "float32"
    for path in report["paths"]:
        assert path["images_per_s"] == pytest.approx(path["images"] / path["wall_s"])
        assert path["s_per_image"] == pytest.approx(1 / path["images_per_s"])
        assert set(path["stages_s"]) == {"encode", "denoise", "decode", "postprocess"}
        assert path["stages_s"]["denoise"] > 0 and path["stages_s"]["postprocess"] > 0
        # stages are timed inside the wall clock (post-processing may overlap)
        assert sum(path["stages_s"].values()) - path["stages_s"]["postprocess"] <= path["wall_s"]
        assert path["peak_memory_mb"] > 0 and path["memory_kind"] == "peak_rss"
        assert path["fraction_of_peak"] == pytest.approx(
            path["achieved_tflops"] / report["peak"]["tflops"]
        )


def test_quality_checks_have_tolerances_and_pass(bench):
    _, report = bench
    variants = {v["variant"]: v for v in report["variants"]}
    assert set(variants) == {"fp32 eager (reference)", "channels_last", "half"}
    assert variants["channels_last"]["passed"] is True
    assert variants["half"]["dtype"] == "bfloat16" and variants["half"]["tolerance"] > 0
    checks = {t["check"]: t for t in report["trajectories"]}
    assert checks["batch 4 vs batch 1"]["passed"] is True
    assert checks["batch 4 vs batch 1"]["tolerance"] == 2
    assert checks["channels_last"]["passed"] is True


def test_embedding_and_planning_sections(bench):
    _, report = bench
    embedding = report["embedding"]
    assert embedding["arch"] == "r18" and embedding["torch"]["faces_per_s"] > 0
    assert "CPUExecutionProvider" in embedding["onnxruntime"]["providers"]
    assert embedding["onnxruntime"]["1_threads"]["faces_per_s_per_core"] > 0
    plan = report["plan_memory"]
    assert plan["images"] == 1200 and plan["identities"] == 100 and plan["passed"] is True


def test_table_is_printed(bench):
    stdout, _ = bench
    for needle in (
        "naive (b4)",
        "engine b4 (b4)",
        "images/s",
        "fraction of peak",
        "speedup vs naive",
        "relative error against fp32",
        "full trajectories",
        "faces/s",
        "planning memory",
    ):
        assert needle in stdout, needle
