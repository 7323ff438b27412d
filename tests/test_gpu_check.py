"""scripts/gpu_check.sh --dry (the GPU check's steps on CPU with the tiny profile) runs end to
end and writes its JSON and Markdown, so the script cannot rot between lent GPU machines; and
its step runner records a failed, over-time or skipped step instead of stopping."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = [
    "env",
    "bench-eager",
    "bench-modes",
    "embedding",
    "pytest-gpu",
    "bench-compile",
    "compile-error",
]


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str, float]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    begin = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    seconds = time.monotonic() - begin
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ], done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    return done, report, (out / "gpu_check.md").read_text(encoding="utf-8"), seconds


def test_dry_run_runs_every_step_and_skips_only_the_compiles(dry):
    done, report, _, seconds = dry
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["mode"] == "dry" and report["finished"] is not None
    assert report["install"]["status"] == "skipped (dry run)"
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for name in STEPS[:5]:
        assert steps[name]["status"] == "ok", steps[name]
        assert 0 < steps[name]["seconds"] <= steps[name]["timeout_s"]
    for name in STEPS[5:]:
        assert steps[name]["status"] == "skipped" and "dry mode" in steps[name]["reason"]
    assert report["wall_s"] < report["budget_s"] == 240
    assert seconds < 240


def test_dry_json_carries_every_measurement(dry):
    _, report, _, _ = dry
    steps = {s["name"]: s for s in report["steps"]}
    env = steps["env"]["result"]
    assert env["cuda_available"] is False and env["packages"]["torch"]
    bench = steps["bench-eager"]["result"]
    assert bench["complete"] is True
    paths = [p["path"] for p in bench["paths"]]
    assert paths == [
        "naive",
        "engine b2 float32",
        "engine b4 float32",
        "engine b2 bfloat16",
        "engine b4 bfloat16",
    ]
    modes = steps["bench-modes"]["result"]
    assert [m["mode"] for m in modes["modes"]] == ["default", "fast4"]
    assert all(m["method"] == "end-to-end" and m["images"] == 4 for m in modes["modes"])
    summary = report["summary"]
    assert [m["mode"] for m in summary["modes"]] == ["default", "fast4"]
    engines = summary["engine_paths"]
    assert [e["dtype"] for e in engines] == ["float32", "float32", "bfloat16", "bfloat16"]
    for engine in engines:
        assert engine["images_per_s"] > 0 and engine["speedup_vs_naive"] > 0
        assert engine["fraction_of_peak"] > 0 and engine["peak_memory_mb"] > 0
        assert engine["postprocess_exposed_s"] >= 0 and engine["oom_events"] == []
    variants = {v["variant"]: v for v in summary["variants"]}
    assert set(variants) == {"fp32 eager (reference)", "channels_last", "fp16", "bf16"}
    assert all(v["passed"] for v in variants.values()), variants
    assert variants["fp16"]["dtype"] == "float16" and variants["bf16"]["dtype"] == "bfloat16"
    assert summary["embedding_faces_per_s"] > 0
    tests = steps["pytest-gpu"]["result"]
    # no CUDA here: every gpu test is collected and skipped, none deselected or broken
    assert tests["source"] == "junit" and tests["counts"]["skipped"] >= 9
    assert tests["counts"]["passed"] == tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert all(t["test"].startswith("tests.test_gpu::") for t in tests["tests"])
    assert summary["targets"] and summary["targets_meaningful"] is False


def test_dry_markdown_has_the_tables(dry):
    _, _, markdown, _ = dry
    assert markdown.startswith("# digi2real GPU check (dry)")
    assert "none of these figures says anything about a GPU" in markdown
    for heading in (
        "## Steps",
        "## Generation",
        "## Modes (end to end, eager)",
        "## Per-call error against fp32",
        "## Embedding",
        "## pytest -m gpu",
        "## Issue targets",
    ):
        assert heading in markdown, heading
    assert "| bench-eager | engine b4 bfloat16 | 4 | bfloat16 |" in markdown
    assert "n/a (dry)" in markdown


# -- the step runner, without the steps ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def python_step(gpu_check: Any, name: str, code: str, cap: float, **kw: Any) -> Any:
    return gpu_check.Step(name, cap, 0, [sys.executable, "-c", code], lambda work: {}, **kw)


def test_a_failed_step_is_recorded_and_the_next_runs(gpu_check, tmp_path):
    runner = gpu_check.Runner(tmp_path, time.time() + 120, {})
    code = "import sys; print('boom'); sys.exit(3)"
    failed = runner.run(python_step(gpu_check, "bad", code, 30), tmp_path / "work")
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert "boom" in failed["error"]
    ok = runner.run(python_step(gpu_check, "good", "print('fine')", 30), tmp_path / "work")
    assert ok["status"] == "ok" and "error" not in ok
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== bad: failed" in log and "===== good: ok" in log


def test_a_step_over_time_is_killed_with_its_children(gpu_check, tmp_path):
    runner = gpu_check.Runner(tmp_path, time.time() + 120, {})
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    begin = time.monotonic()
    entry = runner.run(python_step(gpu_check, "slow", code, 3), tmp_path / "work")
    assert entry["status"] == "timeout" and time.monotonic() - begin < 20
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILLed with its group; reaped by init soon after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {child} outlived the step")


def test_steps_past_the_budget_or_unreadable_are_recorded(gpu_check, tmp_path):
    runner = gpu_check.Runner(tmp_path, time.time() + gpu_check.RESERVE_S + 5, {})
    late = gpu_check.Step("late", 60, 30, [sys.executable, "-c", "pass"], lambda work: {})
    entry = runner.run(late, tmp_path / "work")
    assert entry["status"] == "skipped" and "needs 30" in entry["reason"]

    def unreadable(work: Path) -> dict[str, Any]:
        raise ValueError("no result")

    runner = gpu_check.Runner(tmp_path, time.time() + 120, {})
    step = gpu_check.Step("odd", 30, 0, [sys.executable, "-c", "pass"], unreadable)
    entry = runner.run(step, tmp_path / "work")
    assert entry["status"] == "ok" and entry["result_error"] == "ValueError: no result"
