"""``digi2real bench``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def cmd_bench(args: argparse.Namespace) -> int:
    from digi2real.bench import BenchOptions
    from digi2real.bench.render import render
    from digi2real.bench.run import run_bench

    names = {f.name for f in dataclasses.fields(BenchOptions)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "modes" in values:
        values["modes"] = tuple(m for m in values["modes"].split(",") if m and m != "none")
    report = run_bench(BenchOptions(**values))
    print(render(report))
    print(f"result: {report['result_file']} (`digi2real convert ... --dry-run` reads it)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure generation cost on this device (images/s and FLOPs per mode)",
        description="Images/s and FLOPs per image of each mode (presets) on this device; the "
        "result file is what `convert --dry-run` estimates GPU-hours from.",
    )
    p.add_argument("--profile", choices=("full-random", "tiny", "real"))
    p.add_argument("--weights", type=Path, help="weights dir (--profile real)")
    p.add_argument("--device", help="auto (default: cuda if torch sees one) | cpu | cuda[:N]")
    p.add_argument("--out", "--json", dest="out", type=Path, help="result file")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("modes (what convert --dry-run uses)")
    g.add_argument("--modes", help="comma list of presets, or none (default: all but tiny)")
    g.add_argument("--method", choices=("auto", "end-to-end", "composed"))
    g.add_argument("--batch-size", type=int, help="every mode's batch (default: the preset's)")
    g.add_argument("--mode-dtype", help="every mode's dtype (default: the preset's)")
    g.add_argument("--mode-images", type=int, help="images per mode, end-to-end")
    g.add_argument("--mode-compile", choices=("on", "off"), help="default: the preset's (CUDA)")
    g.add_argument("--repeats", type=int, help="timed calls per measurement")
    g = p.add_argument_group("naive loop vs engine (--naive)")
    g.add_argument("--naive", action="store_true", default=None)
    g.add_argument("--images", type=int)
    g.add_argument("--batch-sizes", type=int, nargs="+")
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--compile", action="store_true", default=None)
    g.add_argument("--engine-dtypes", nargs="+", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--no-channels-last", action="store_true", default=None)
    g = p.add_argument_group("checks")
    g.add_argument("--variants", nargs="+", help="channels_last half fp16 bf16 compile")
    g.add_argument("--variant-batch", type=int)
    g.add_argument("--trajectories", action="store_true", default=None, help="(tiny profile)")
    g.add_argument("--embedding", action="store_true", default=None)
    g.add_argument("--embed-arch", choices=("r100", "r50", "r18"))
    g.add_argument("--embed-batch", type=int)
    g.add_argument("--embed-seconds", type=float)
    g.add_argument("--no-onnx", action="store_true", default=None)
    g.add_argument("--plan-images", type=int, help="peak memory of planning N images")
    p.set_defaults(func=cmd_bench)
