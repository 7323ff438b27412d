"""``digi2real bench``: measure this device, write a result file ``convert --dry-run`` reads.

By default: FLOPs per image of each mode (presets ``default``, ``fast``, ``fast20``,
``fast15``, ``fast4``), counted on meta-device copies of the benchmarked architecture, and its
measured images/s (:mod:`digi2real.bench.modes`). On request: Arc2Face's naive loop against
the engine (``--naive``), per-call error of the speed options (``--variants``), full
trajectories on the tiny profile (``--trajectories``), the embedding stage (``--embedding``) and
the memory of planning a large run (``--plan-images``).

The result file is rewritten after every section (``"complete": false`` until the end), so a
run stopped at a time limit keeps what it measured (scripts/gpu_check.py reads it).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from digi2real.bench.checks import compiled_trajectory, measure_variants, trajectory_checks
from digi2real.bench.embedding import embedding_throughput, plan_memory
from digi2real.bench.measure import device_name, matmul_peak_tflops, unit_rows
from digi2real.bench.models import build_setup, count_flops, flops_per_image
from digi2real.bench.modes import ratios, run_modes
from digi2real.bench.options import BenchOptions
from digi2real.bench.paths import NAIVE_IMAGES_PER_PROMPT, time_paths
from digi2real.data import fsio
from digi2real.face.stack import FaceStack
from digi2real.runner.cost import BENCH_FORMAT, BENCH_KIND, default_bench_file
from digi2real.version import __version__

logger = logging.getLogger(__name__)


def write_result(path: Path, report: dict[str, Any]) -> None:
    # whole or not at all: a reader (convert --dry-run, gpu_check.py) may read it after a kill
    import json

    fsio.atomic_write_bytes(path, (json.dumps(report, indent=2, default=str) + "\n").encode())


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Measure what ``options`` asks for; the report is also written to ``options.out``
    (default :func:`~digi2real.runner.cost.default_bench_file`)."""
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {options.device}: torch sees no CUDA device")
    if options.threads:
        torch.set_num_threads(options.threads)
    out = options.out or default_bench_file()
    with tempfile.TemporaryDirectory(prefix="digi2real-bench-") as tmp:
        workdir = Path(tmp)
        setup = build_setup(options, workdir)
        device, gen = setup.device, setup.generator
        logger.info("counting FLOPs")
        flops = count_flops(gen, setup.taesd_config)
        work = flops_per_image(flops, options.steps, options.guidance)
        peak_info = matmul_peak_tflops(device)
        report: dict[str, Any] = {
            "format": BENCH_FORMAT,
            "kind": BENCH_KIND,
            "digi2real": __version__,
            "device": {"type": device.type, "name": device_name(device)},
            "run": {
                "profile": options.profile,
                "device": str(device),
                "device_name": device_name(device),
                "torch": torch.__version__,
                "resolution": gen.resolution,
                "steps": options.steps,
                "guidance": options.guidance,
                "threads": torch.get_num_threads(),
                "attention": gen.attention_processors(),
                "notes": setup.notes,
            },
            "flops": flops,
            "flops_per_image": work,
            "peak": peak_info,
            "complete": False,
        }

        def save() -> None:
            write_result(out, report)

        save()
        if options.variants:
            report["variant_batch"] = options.variant_batch
            report["variant_tf32"] = False
            logger.info("per-call speed options")
            report["variants"] = measure_variants(
                setup, options.variants, options.variant_batch, options.repeats
            )
            save()
        if options.trajectories:
            if options.profile != "tiny":
                raise ValueError("--trajectories runs on --profile tiny (full trajectories)")
            logger.info("trajectories")
            report["trajectories"] = trajectory_checks(setup, options.steps, 4)
            if "compile" in options.variants:
                report["trajectories"].append(compiled_trajectory(setup, options.steps, 4))
            save()
        if options.naive:
            face = FaceStack(setup.config, setup.face_weights, device=str(device))
            identities = math.ceil(options.images / NAIVE_IMAGES_PER_PROMPT)
            report["run"]["images"] = identities * NAIVE_IMAGES_PER_PROMPT
            ids = unit_rows(identities, gen.encoder.id_dim, seed=options.seed)
            time_paths(options, setup, face, ids, work, peak_info["tflops"], report, save)
        # last of the generation sections: each mode converts the shared models in place
        # (dtype, channels_last, compile); the naive loop above needs them as loaded
        if options.modes:
            report["modes"] = []
            report["modes"] = run_modes(options, setup, flops, save)
            report["mode_ratios"] = ratios(report["modes"])
            save()
        if options.embedding:
            logger.info("embedding stage")
            report["embedding"] = embedding_throughput(
                options.embed_arch,
                device,
                options.embed_batch,
                options.embed_seconds,
                not options.no_onnx,
                workdir,
            )
            save()
        if options.plan_images:
            logger.info("planning memory")
            report["plan_memory"] = plan_memory(options.plan_images)
    report["complete"] = True
    report["result_file"] = str(out)
    save()
    return report
