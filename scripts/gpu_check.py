"""The GPU check: one prepared run that measures generation speed and exercises every CUDA path.

Run through ``scripts/gpu_check.sh`` (which installs the carried wheels first); docs/
performance.md "GPU check" says how to call it on a lent machine. Each step is a child process
with its own time cap; a step that fails or runs out of time is recorded in the JSON and the
next one runs. The whole run stays inside ``--deadline`` (the shell gives it 8 minutes from its
own start); the later a step, the less it matters, and the last ones get what time is left.

Steps (full run on CUDA; ``--dry``: the same steps on CPU with the tiny profile)::

    env            python, torch, CUDA, the GPU, package versions, onnxruntime providers
    bench-eager    `digi2real bench --naive`, full-size Arc2Face architecture with random
                   weights at Arc2Face defaults (DPM-Solver++ 25 steps, guidance 3.0, 512x512):
                   the naive loop beside the engine at batch 8/16/32 in fp16 and bf16; per-call
                   error of channels_last, fp16 and bf16 against fp32
    bench-modes    `digi2real bench`: images/s end to end and FLOPs per image of the presets
                   default, fast, fast20, fast15 and fast4 (LCM 4 steps, TAESD), eager: the
                   result file `convert --dry-run` estimates GPU-hours from
    embedding      IResNet-100 (arcface.onnx's architecture, random weights) on the GPU, torch
    pytest-gpu     pytest -m gpu (tests/test_gpu.py: every CUDA-only path)
    bench-compile  the engine with torch.compile, fp16 and bf16, batch 16, beside the naive loop
    compile-error  per-call error of torch.compile against fp32 (bench --variants compile)

Outputs in ``--out``: gpu_check.json (everything, rewritten after each step), gpu_check.md
(the tables) and gpu_check.log (every step's output).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = ["-m", "digi2real", "bench"]
SCHEMA = 1
FULL_BUDGET_S = 480  # the issue: the whole check inside 8 minutes of wall time
DRY_BUDGET_S = 240
RESERVE_S = 10  # kept back at the end to write the outputs
# What the lent machine cannot get (measured here with `pip download`; docs/performance.md)
NOT_CARRIED = {
    "onnxruntime-gpu": "onnxruntime-gpu 1.31.1's wheel is 255.6 MB, over the 64 MiB that "
    "travels: the embedding stage is timed with torch on the GPU only",
    "ray": "ray 2.60.0's wheel is 79.3 MB, over the 64 MiB that travels: the Ray test skips",
}
PACKAGES = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface-hub",
    "safetensors",
    "insightface",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "opencv-python",
    "opencv-python-headless",
    "faiss-cpu",
    "webdataset",
    "ray",
    "pydantic",
    "numpy",
    "pyarrow",
    "pytest",
)
# Issue targets, compared (not estimated) against what the run measured.
TARGET_SPEEDUP = 4.0  # engine vs the naive loop, same run
TARGET_STRETCH_IMAGES_PER_S = 12.0  # per H100 (the lent machine may be another GPU: named)
TARGET_NON_DIFFUSION = 0.05  # post-processing exposed / wall
TARGET_FACES_PER_S = 2000.0  # R100 embedding, one GPU


# -- the steps ---------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    cap_s: float  # at most this long
    min_s: float  # not started with less than this left
    command: list[str] | None  # None: skipped, see ``skip``
    read: Callable[[Path], dict[str, Any]]  # the step's result from its work folder
    skip: str = ""
    what: str = ""


def bench_args(dry: bool, kind: str) -> list[str]:
    """`digi2real bench`'s options for one step. Full: the full-size architecture at Arc2Face
    defaults on CUDA. Dry: the tiny profile on CPU, the same options at sizes that take
    seconds."""
    if kind == "modes":
        if dry:
            return [
                *("--profile", "tiny", "--device", "cpu", "--threads", "1"),
                *("--modes", "default,fast4", "--method", "end-to-end", "--mode-images", "4"),
            ]
        # eager: a compilation per mode and batch shape would not fit the budget; the compile
        # steps below measure what it adds
        return [
            *("--profile", "full-random", "--device", "cuda", "--method", "end-to-end"),
            *("--modes", "default,fast,fast20,fast15,fast4", "--mode-images", "64"),
            *("--mode-compile", "off"),
        ]
    if dry:
        # the compile steps are skipped in dry mode (steps_for): only the eager one runs
        return [
            *("--profile", "tiny", "--device", "cpu", "--steps", "2", "--threads", "1"),
            *("--modes", "none", "--naive"),
            *("--images=4", "--batch-sizes", "2", "4", "--engine-dtypes", "float32", "bfloat16"),
            *("--variants", "channels_last", "fp16", "bf16", "--variant-batch=1", "--repeats=1"),
        ]
    common = ["--profile", "full-random", "--device", "cuda", "--steps", "25", "--guidance", "3.0"]
    common += ["--modes", "none"]
    if kind == "eager":
        return common + [
            "--naive",
            "--images=32",
            "--batch-sizes",
            "8",
            "16",
            "32",
            "--engine-dtypes",
            "float16",
            "bfloat16",
            "--variants",
            "channels_last",
            "fp16",
            "bf16",
            "--variant-batch=4",
            "--repeats=3",
        ]
    if kind == "compile":
        # one batch shape: each shape (and dtype) is a compilation of UNet and VAE decoder
        return common + [
            "--naive",
            "--images=16",
            "--batch-sizes",
            "16",
            "--compile",
            "--engine-dtypes",
            "float16",
            "bfloat16",
        ]
    return common + [
        "--variants",
        "compile",
        "--variant-batch=2",
        "--repeats=3",
    ]


def read_json(name: str) -> Callable[[Path], dict[str, Any]]:
    def read(work: Path) -> dict[str, Any]:
        path = work / name
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    return read


def read_pytest(work: Path) -> dict[str, Any]:
    """Per-test outcomes from the JUnit XML, else (a killed run writes none) from the -v log."""
    tests: list[dict[str, str]] = []
    xml = work / "pytest.xml"
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                    message = (child.get("message") or "").strip()
                    message = message.splitlines()[0][:300] if message else ""
                    break
            tests.append({"test": name, "outcome": outcome, "message": message})
        source = "junit"
    else:
        log = work / "step.log"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        for match in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, re.M):
            tests.append({"test": match[1], "outcome": match[2].lower(), "message": ""})
        source = "log"
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error")}
    counts["skipped"] = sum(t["outcome"] == "skipped" for t in tests)
    return {"source": source, "counts": counts, "tests": tests}


def steps_for(dry: bool, python: str) -> list[Step]:
    child = [python, str(Path(__file__).resolve())] + (["--dry"] if dry else [])
    bench = [python, *BENCH]
    no_compile = (
        "dry mode: inductor compilations take minutes on this CPU; the GPU run compiles"
        if dry
        else ""
    )
    return [
        Step(
            "env",
            30,
            5,
            [*child, "--child", "env"],
            read_json("result.json"),
            what="python, torch, CUDA, the GPU, packages",
        ),
        Step(
            "bench-eager",
            180,
            45,
            [*bench, *bench_args(dry, "eager")],
            read_json("bench.json"),
            what="naive loop vs engine, batch sizes, fp16/bf16, per-call errors",
        ),
        Step(
            "bench-modes",
            120,
            40,
            [*bench, *bench_args(dry, "modes")],
            read_json("bench.json"),
            what="images/s and FLOPs per image of default, fast*, fast4",
        ),
        Step(
            "embedding",
            45,
            15,
            [*child, "--child", "embedding"],
            read_json("result.json"),
            what="IResNet faces/s on the device (R100 on CUDA, torch)",
        ),
        Step(
            "pytest-gpu",
            120,
            30,
            [
                python,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-v",
                "-p",
                "no:cacheprovider",
                "--continue-on-collection-errors",
                "--junitxml={work}/pytest.xml",
                "tests",
            ],
            read_pytest,
            what="pytest -m gpu",
        ),
        Step(
            "bench-compile",
            180,
            90,
            None if dry else [*bench, *bench_args(dry, "compile")],
            read_json("bench.json"),
            skip=no_compile,
            what="engine with torch.compile, fp16/bf16",
        ),
        Step(
            "compile-error",
            150,
            60,
            None if dry else [*bench, *bench_args(dry, "compile-error")],
            read_json("bench.json"),
            skip=no_compile,
            what="per-call error of torch.compile vs fp32",
        ),
    ]


# -- running them ------------------------------------------------------------------------------


class Stopped(Exception):
    """SIGTERM (the shell's hard stop, or the user): end the running step, write the outputs."""


def stop(signum: int, _frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


@dataclass
class Runner:
    out: Path
    deadline: float  # time.time() by which everything, outputs included, is written
    report: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.time()

    def run(self, step: Step, work_root: Path) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": step.name, "what": step.what, "cap_s": step.cap_s}
        if step.command is None:
            return {**entry, "status": "skipped", "reason": step.skip}
        timeout = min(step.cap_s, self.left())
        if timeout < step.min_s:
            reason = f"{max(self.left(), 0):.0f} s left of the budget; it needs {step.min_s:.0f}"
            return {**entry, "status": "skipped", "reason": reason}
        work = work_root / step.name
        work.mkdir(parents=True, exist_ok=True)
        command = [part.replace("{work}", str(work)) for part in step.command]
        if command[1:4] == BENCH:
            command.append(f"--json={work / 'bench.json'}")
        elif "--child" in command:
            command.append(f"--result={work / 'result.json'}")
        entry.update(command=command, timeout_s=round(timeout, 1))
        log = work / "step.log"
        print(f"[gpu_check] {step.name}: up to {timeout:.0f} s", flush=True)
        begin = time.time()
        with open(log, "wb") as handle:
            # its own process group: a step over time is killed with its children (compile
            # workers, Ray, spawned runners), and only those
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env={**os.environ, **self.env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout=timeout)
                status = "ok" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                # over time, or the driver itself stopped (Stopped): the step goes with its
                # group; after a normal end, whatever it left behind (a Ray worker) goes too
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
        entry.update(status=status, returncode=code, seconds=round(time.time() - begin, 2))
        text = log.read_text(encoding="utf-8", errors="replace")
        self.append_log(step.name, command, status, text)
        try:
            entry["result"] = step.read(work)
        except Exception as error:  # noqa: BLE001 - an unreadable result is recorded, not fatal
            entry["result_error"] = f"{type(error).__name__}: {error}"
        if status != "ok":
            entry["error"] = last_lines(text, 30)
        if step.name == "pytest-gpu" and status == "failed" and entry.get("result"):
            counts = entry["result"]["counts"]
            entry["reason"] = f"{counts['failed']} failed, {counts['error']} errors"
        return entry

    def append_log(self, name: str, command: list[str], status: str, text: str) -> None:
        with open(self.out / "gpu_check.log", "a", encoding="utf-8") as handle:
            handle.write(f"\n===== {name}: {status}\n$ {' '.join(command)}\n{text}\n")


def last_lines(text: str, count: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])


# -- the child steps ---------------------------------------------------------------------------


def child_env(dry: bool) -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_defaults": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "pythonpath": os.environ.get("PYTHONPATH", "").split(os.pathsep),
    }
    info["gpus"] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    if torch.cuda.is_available():
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as error:
        info["onnxruntime_providers"] = f"not importable: {error}"
    info["not_carried"] = NOT_CARRIED
    # read-only queries: the card's settings are left as they are
    query = "name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"unavailable: {error}"
    return info


def child_embedding(dry: bool) -> dict[str, Any]:
    """`digi2real bench`'s embedding stage at two batch sizes: torch fp16 channels_last on
    CUDA (no onnxruntime GPU build travels; NOT_CARRIED), fp32 on CPU in dry mode."""
    import torch

    from digi2real.bench.embedding import embedding_throughput

    if dry:
        arch, device, batches, seconds = "r18", torch.device("cpu"), [2], 0.2
        torch.set_num_threads(1)
    else:
        arch, device, batches, seconds = "r100", torch.device("cuda"), [128, 512], 2.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-embed-") as tmp:
        for batch in batches:
            rows.append(embedding_throughput(arch, device, batch, seconds, False, Path(tmp)))
    import onnxruntime

    return {
        "arch": arch,
        "device": str(device),
        "rows": rows,
        "onnxruntime": {
            "version": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(),
            "gpu_timed": False,
            "why": NOT_CARRIED["onnxruntime-gpu"],
        },
    }


# -- the report --------------------------------------------------------------------------------


def step_result(report: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in report["steps"]:
        if entry["name"] == name:
            return entry.get("result") or {}
    return {}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from the steps that produced them."""
    summary: dict[str, Any] = {}
    engines = []
    for name in ("bench-eager", "bench-compile"):
        bench = step_result(report, name)
        paths = bench.get("paths") or []
        naive = next((p for p in paths if p.get("path") == "naive"), None)
        for path in paths:
            if path.get("path") == "naive":
                continue
            row = {
                "step": name,
                "path": path["path"],
                "batch": path.get("batch"),
                "dtype": path.get("dtype"),
                "compile": path.get("compile"),
                "images_per_s": path.get("images_per_s"),
                "fraction_of_peak": path.get("fraction_of_peak"),
                "peak_memory_mb": path.get("peak_memory_mb"),
                "postprocess_exposed_s": path.get("postprocess_exposed_s"),
                "non_diffusion_fraction": path.get("non_diffusion_fraction"),
                "oom_events": path.get("oom_events"),
            }
            if naive and naive.get("images_per_s"):
                row["speedup_vs_naive"] = path["images_per_s"] / naive["images_per_s"]
            engines.append(row)
        if naive:
            summary.setdefault("naive_images_per_s", {})[name] = naive.get("images_per_s")
    summary["engine_paths"] = engines
    timed = [e for e in engines if e.get("images_per_s")]
    if timed:
        best = max(timed, key=lambda e: e["images_per_s"])
        summary["best_engine"] = best
    variants = []
    for name in ("bench-eager", "compile-error"):
        for row in step_result(report, name).get("variants") or []:
            variants.append({"step": name, **row})
    summary["variants"] = variants
    embedding = step_result(report, "embedding")
    rates = [
        row["torch"]["faces_per_s"]
        for row in embedding.get("rows", [])
        if row.get("torch", {}).get("faces_per_s")
    ]
    if rates:
        summary["embedding_faces_per_s"] = max(rates)
    modes = step_result(report, "bench-modes")
    if modes.get("modes"):
        ratios = modes.get("mode_ratios", {})
        summary["modes"] = [
            {
                "mode": m["mode"],
                **{k: m["settings"][k] for k in ("sampler", "steps", "decoder", "dtype")},
                "batch": m["settings"]["batch_size"],
                "tflop_per_image": m["flops_per_image"] / 1e12,
                "images_per_s": m.get("images_per_s"),
                "time_x_default": ratios.get(m["mode"], {}).get("time"),
            }
            for m in modes["modes"]
        ]
    tests = step_result(report, "pytest-gpu")
    if tests:
        summary["pytest_gpu"] = tests.get("counts")
    summary["targets"] = targets(summary)
    # a dry run's figures come from the tiny profile on CPU: compared, never meaningful
    summary["targets_meaningful"] = report["mode"] == "full"
    return summary


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue target beside what this run measured (a target with no measurement is left
    out, not guessed)."""
    rows = []

    def add(target: str, value: Any, met: bool) -> None:
        rows.append({"target": target, "value": value, "met": met})

    best = summary.get("best_engine") or {}
    speedups = [e["speedup_vs_naive"] for e in summary["engine_paths"] if "speedup_vs_naive" in e]
    if speedups:
        value = max(speedups)
        add(
            f"engine >= {TARGET_SPEEDUP:g}x the naive loop (same run)",
            value,
            value >= TARGET_SPEEDUP,
        )
    if best:
        value = best["images_per_s"]
        add(
            f"{TARGET_STRETCH_IMAGES_PER_S:g} images/s (stretch, per H100)",
            value,
            value >= TARGET_STRETCH_IMAGES_PER_S,
        )
        fraction = best.get("non_diffusion_fraction")
        if fraction is not None:
            add(
                f"non-diffusion < {TARGET_NON_DIFFUSION:.0%} of wall (fastest path)",
                fraction,
                fraction < TARGET_NON_DIFFUSION,
            )
    checked = [v for v in summary["variants"] if "passed" in v]
    if checked:
        bad = [v["variant"] for v in checked if not v["passed"]]
        add("per-call error of each option within its tolerance", ", ".join(bad) or "all", not bad)
    if "embedding_faces_per_s" in summary:
        value = summary["embedding_faces_per_s"]
        add(
            f"embedding >= {TARGET_FACES_PER_S:g} faces/s (R100, one GPU)",
            value,
            value >= TARGET_FACES_PER_S,
        )
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-2:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    env = step_result(report, "env")
    gpus = env.get("gpus") or []
    device = ", ".join(g["name"] for g in gpus) or f"CPU ({env.get('cpu_count', '?')} cores)"
    out = [f"# digi2real GPU check ({report['mode']})", ""]
    if report["mode"] == "dry":
        out += [
            "**Dry run: the tiny profile on CPU. It checks that the script and its outputs work;"
            " none of these figures says anything about a GPU.**",
            "",
        ]
    out += [
        f"- device: {device}; torch {env.get('torch', '?')}, CUDA {env.get('torch_cuda')}, "
        f"python {env.get('python', '?')}",
        f"- started {report['started']}, {fmt(report.get('wall_s'))} s of a "
        f"{report['budget_s']} s budget; finished: {fmt(report.get('finished') is not None)}",
        f"- wheels: {report['install'].get('status')} "
        f"({len(report['install']['wheels'])} in .whl/, {report['install']['wheels_mib']} MiB)",
        "",
        "## Steps",
        "",
    ]
    rows = [
        [
            s["name"],
            s["status"],
            s.get("seconds"),
            s.get("timeout_s", s.get("cap_s")),
            s.get("reason") or s.get("result_error") or s.get("what", ""),
        ]
        for s in report["steps"]
    ]
    out += [md_table(["step", "status", "seconds", "cap s", "note"], rows), ""]
    bench = step_result(report, "bench-eager") or step_result(report, "bench-compile")
    summary = report.get("summary") or {}
    if bench.get("run"):
        head = bench["run"]
        peak = bench.get("peak", {})
        out += [
            "## Generation",
            "",
            f"{head['profile']} profile, {head['resolution']}x{head['resolution']}, "
            f"{head['steps']} steps DPM-Solver++, guidance {head['guidance']}; "
            f"{fmt(bench.get('flops_per_image', 0) / 1e12)} TFLOP per image; matrix-product "
            f"peak measured in the same run: {fmt(peak.get('tflops'))} TFLOP/s "
            f"({peak.get('dtype')}). Naive loop (Arc2Face README, batch 4 per identity): "
            + ", ".join(
                f"{step} {fmt(v)} images/s"
                for step, v in (summary.get("naive_images_per_s") or {}).items()
            ),
            "",
        ]
        rows = [
            [
                e["step"],
                e["path"],
                e["batch"],
                e["dtype"],
                e["compile"],
                e["images_per_s"],
                e.get("speedup_vs_naive"),
                e["fraction_of_peak"],
                e["peak_memory_mb"],
                e["postprocess_exposed_s"],
                e["non_diffusion_fraction"],
                len(e.get("oom_events") or []),
            ]
            for e in summary.get("engine_paths", [])
        ]
        headers = ["step", "path", "batch", "dtype", "compile", "images/s", "x naive"]
        headers += ["fraction of peak", "peak MiB", "post-process exposed s"]
        headers += ["non-diffusion", "OOM halvings"]
        out += [md_table(headers, rows), ""]
    if summary.get("modes"):
        rows = [
            [
                m["mode"],
                f"{m['sampler']} {m['steps']}",
                m["decoder"],
                m["dtype"],
                m["batch"],
                m["tflop_per_image"],
                m["images_per_s"],
                m["time_x_default"],
            ]
            for m in summary["modes"]
        ]
        headers = ["mode", "sampler", "decoder", "dtype", "batch", "TFLOP/image", "images/s"]
        out += [
            "## Modes (end to end, eager)",
            "",
            md_table([*headers, "time x default"], rows),
            "",
        ]
    if summary.get("variants"):
        rows = [
            [
                v["step"],
                v["variant"],
                v.get("dtype", "float32"),
                v.get("unet_rel_error"),
                v.get("vae_rel_error"),
                v.get("tolerance"),
                v.get("passed") if "error" not in v else v["error"][:80],
                v.get("unet_speedup"),
                v.get("vae_speedup"),
            ]
            for v in summary["variants"]
        ]
        out += [
            "## Per-call error against fp32 (TF32 off, random inputs)",
            "",
            md_table(
                [
                    "step",
                    "variant",
                    "dtype",
                    "UNet err",
                    "VAE err",
                    "tol",
                    "pass",
                    "UNet x",
                    "VAE x",
                ],
                rows,
            ),
            "",
        ]
    embedding = step_result(report, "embedding")
    if embedding.get("rows"):
        rows = [
            [r["torch"]["runtime"], r["batch"], r["torch"]["faces_per_s"]]
            for r in embedding["rows"]
        ]
        out += [
            f"## Embedding ({embedding['arch']}, random weights, {embedding['device']})",
            "",
            md_table(["runtime", "batch", "faces/s"], rows),
            "",
            f"onnxruntime {embedding['onnxruntime']['version']}: providers "
            f"{', '.join(embedding['onnxruntime']['providers'])}; not timed on the GPU: "
            f"{embedding['onnxruntime']['why']}.",
            "",
        ]
    tests = step_result(report, "pytest-gpu")
    if tests:
        counts = tests.get("counts", {})
        out += [
            "## pytest -m gpu",
            "",
            ", ".join(f"{v} {k}" for k, v in counts.items()),
            "",
        ]
        bad = [t for t in tests.get("tests", []) if t["outcome"] in ("failed", "error")]
        if bad:
            out += [md_table(["test", "outcome", "message"], [list(t.values()) for t in bad]), ""]
    if summary.get("targets"):
        dry = report["mode"] == "dry"
        rows = [
            [t["target"], t["value"], "n/a (dry)" if dry else t["met"]] for t in summary["targets"]
        ]
        out += ["## Issue targets", "", md_table(["target", "measured", "met"], rows), ""]
    return "\n".join(out) + "\n"


def write_outputs(report: dict[str, Any], out: Path) -> None:
    report["summary"] = summarize(report)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"),
        ("gpu_check.md", markdown(report)),
    ):
        temp = out / f".{name}.tmp"
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, out / name)


# -- main --------------------------------------------------------------------------------------


def install_record(args: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {"status": args.install_status, "seconds": args.install_seconds}
    wheels = sorted(REPO.glob(".whl/*.whl"))
    record["wheels"] = {w.name: w.stat().st_size for w in wheels}  # bytes
    record["wheels_mib"] = round(sum(record["wheels"].values()) / 2**20, 2)
    if args.install_log and Path(args.install_log).is_file():
        record["log_tail"] = last_lines(Path(args.install_log).read_text(errors="replace"), 20)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny profile on CPU (no GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check")
    parser.add_argument(
        "--budget", type=float, help="seconds for everything (default 480; dry 240)"
    )
    parser.add_argument(
        "--started",
        type=float,
        help="time.time() the budget counts from (the shell's start: the wheel install is "
        "inside the budget); default now",
    )
    parser.add_argument("--only", help="comma list of steps to run (the rest: skipped)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the steps")
    parser.add_argument("--install-status", default="skipped (dry run)")
    parser.add_argument("--install-seconds", type=float, default=0.0)
    parser.add_argument("--install-log")
    parser.add_argument("--child", choices=("env", "embedding"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = {"env": child_env, "embedding": child_embedding}[args.child](args.dry)
        args.result.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
        return 0
    start = args.started or time.time()
    budget = args.budget or (DRY_BUDGET_S if args.dry else FULL_BUDGET_S)
    deadline = start + budget
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("", encoding="utf-8")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "dry" if args.dry else "full",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "finished": None,
        "budget_s": int(budget) if float(budget).is_integer() else budget,
        "install": install_record(args),
        "not_carried": NOT_CARRIED,
        "steps": [],
    }
    steps = steps_for(args.dry, args.python)
    selected = set(args.only.split(",")) if args.only else None
    if selected and (unknown := selected - {s.name for s in steps}):
        raise SystemExit(f"--only: unknown step(s) {sorted(unknown)}")
    runner = Runner(out, deadline, report, env={"PYTHONUNBUFFERED": "1"})
    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for step in steps:
            if selected is not None and step.name not in selected:
                step.command, step.skip = None, "not selected (--only)"
            try:
                entry = runner.run(step, Path(tmp))
            except Stopped as why:
                report["steps"].append({"name": step.name, "status": "stopped", "reason": str(why)})
                report["stopped"] = str(why)
                break
            report["steps"].append(entry)
            report["wall_s"] = round(time.time() - start, 1)
            write_outputs(report, out)
            print(f"[gpu_check] {step.name}: {entry['status']}", flush=True)
    if "stopped" not in report:
        report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["wall_s"] = round(time.time() - start, 1)
    write_outputs(report, out)
    print((out / "gpu_check.md").read_text(encoding="utf-8"))
    failed = [s["name"] for s in report["steps"] if s["status"] in ("failed", "timeout", "stopped")]
    if failed:
        print(f"[gpu_check] failed: {', '.join(failed)} (see gpu_check.json / gpu_check.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
