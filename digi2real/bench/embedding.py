"""The embedding stage's throughput (an R100-sized IResNet, torch and onnxruntime) and the
peak memory of planning a large run (in a fresh process)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from digi2real.bench.measure import rss_mb
from digi2real.config import Config

EMBED_ARCHS = {"r100": (3, 13, 30, 3), "r50": (3, 4, 14, 3), "r18": (2, 2, 2, 2)}


def embedding_throughput(
    arch: str, device: torch.device, batch: int, seconds: float, onnx: bool, workdir: Path
) -> dict[str, Any]:
    """Aligned faces/s of an IResNet (R100 = arcface.onnx's size) with random weights."""
    from digi2real.evaluate.backbones import IResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IResNet(EMBED_ARCHS[arch]).eval()
    faces = torch.randn(batch, 3, 112, 112)
    result: dict[str, Any] = {"arch": arch, "batch": batch}

    def rate(run: Callable[[], Any]) -> float:
        run()
        count, begin = 0, time.perf_counter()
        while True:
            run()
            count += batch
            elapsed = time.perf_counter() - begin
            if elapsed >= seconds:
                return count / elapsed

    if device.type == "cuda":
        torch_model = model.to(device, torch.float16).to(memory_format=torch.channels_last)
        x = faces.to(device, torch.float16).contiguous(memory_format=torch.channels_last)

        def torch_run() -> None:
            with torch.inference_mode():
                torch_model(x)
            torch.cuda.synchronize(device)

        result["torch"] = {
            "runtime": "torch CUDA fp16 channels_last",
            "faces_per_s": rate(torch_run),
        }
    else:
        threads = torch.get_num_threads()

        def torch_run() -> None:
            with torch.inference_mode():
                model(faces)

        per_s = rate(torch_run)
        result["torch"] = {
            "runtime": f"torch CPU fp32, {threads} threads",
            "faces_per_s": per_s,
            "faces_per_s_per_core": per_s / threads,
        }
    if onnx:
        result["onnxruntime"] = onnx_throughput(model.float().cpu(), faces, workdir, rate)
    return result


def onnx_throughput(
    model: torch.nn.Module, faces: torch.Tensor, workdir: Path, rate: Callable[..., float]
) -> dict[str, Any]:
    import onnxruntime as ort

    from digi2real.face.session import make_session

    path = workdir / "iresnet.onnx"
    begin = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (faces[:2],),
            dynamo=True,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            external_data=False,
            optimize=True,
        )
    program.save(str(path))
    export_s = time.perf_counter() - begin
    blob = faces.numpy()
    cores = os.cpu_count() or 1
    rows = {}
    for threads in sorted({1, cores}):
        session = make_session(path, "cpu", intra_op_threads=threads)
        name = session.get_inputs()[0].name
        per_s = rate(lambda s=session, n=name: s.run(None, {n: blob}))
        rows[f"{threads}_threads"] = {"faces_per_s": per_s, "faces_per_s_per_core": per_s / threads}
    return {
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "providers": session.get_providers(),
        "export_s": export_s,
        **rows,
    }


# -- planning memory ---------------------------------------------------------------------------


def plan_memory_child(images: int, per_identity: int, shard_size: int) -> dict[str, Any]:
    """Runs in a fresh process: plan ``images`` fake files as the runner does (Plan ->
    plan_table -> plan.parquet bytes -> load_plan) and report the peak RSS."""
    from digi2real.data import fsio
    from digi2real.data.layout import OutLayout
    from digi2real.data.manifest import error_table, parquet_bytes, write_parquet
    from digi2real.data.readers import IdentitySource
    from digi2real.runner import plan as plan_module

    baseline = rss_mb()["rss_mb"]
    begin = time.perf_counter()
    root = Path("/data/digiface")
    identities = math.ceil(images / per_identity)
    sources = [
        IdentitySource(f"{i:06d}", [root / f"{i:06d}" / f"{k}.png" for k in range(per_identity)])
        for i in range(identities)
    ]
    shards = [sources[i : i + shard_size] for i in range(0, len(sources), shard_size)]
    plan = plan_module.Plan(root, shards, [])
    built = rss_mb()["rss_mb"]
    table = plan_module.plan_table(plan)
    data = parquet_bytes(table)
    del table, plan, shards, sources
    with tempfile.TemporaryDirectory() as tmp:
        paths = OutLayout(tmp)
        fsio.atomic_write_bytes(paths.plan, data)
        write_parquet(paths.plan_errors, error_table([]))
        config = Config().override({"source.root": str(root)})
        loaded = plan_module.load_plan(Path(tmp), config)
        assert loaded.num_images == identities * per_identity
    return {
        "images": identities * per_identity,
        "identities": identities,
        "plan_parquet_mb": len(data) / 2**20,
        "baseline_rss_mb": baseline,
        "rss_after_plan_objects_mb": built,
        "peak_rss_mb": rss_mb()["peak_rss_mb"],
        "seconds": time.perf_counter() - begin,
        "target_mb": 2048,
        "passed": rss_mb()["peak_rss_mb"] < 2048,
    }


def plan_memory(images: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "digi2real.bench.embedding", "--plan-child", str(images)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"images": images, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    """``python -m digi2real.bench.embedding --plan-child N``: the child of :func:`plan_memory`."""
    images = int(sys.argv[sys.argv.index("--plan-child") + 1])
    print(json.dumps(plan_memory_child(images, 12, 64)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
