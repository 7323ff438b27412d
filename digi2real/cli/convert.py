"""``digi2real convert``, ``augment`` and ``demo``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from digi2real.cli.common import TINY_NOTICE, add_config_flags, config_from_args, is_tiny
from digi2real.config import RUNNERS


def cmd_convert(args: argparse.Namespace) -> int:
    from digi2real.env import check_environment
    from digi2real.runner.convert import convert, preflight

    check_environment()
    formats = args.formats.split(",") if args.formats else None
    config = config_from_args(
        args,
        **{
            "source.root": str(args.src),
            "source.license": args.source_license,
            "interpolation.outputs_per_identity": args.outputs_per_identity,
            "output.formats": formats,
            "output.shard_size": args.shard_size,
            "run.devices": args.devices,
            "run.runner": args.runner,
            "run.ray_address": args.ray_address,
        },
    ).validate()
    if args.dry_run:
        report = preflight(config, args.out)
        width = max(len(k) for k in report)
        for key, value in report.items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
        return 0
    start = time.perf_counter()
    summary = convert(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"done in {time.perf_counter() - start:.1f}s")
    for line in summary.lines():
        print(line)
    if is_tiny(config.weights):
        print(TINY_NOTICE)
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from digi2real.api import Digi2Real

    config = config_from_args(args)
    d2r = Digi2Real.from_pretrained(config.weights, config=config, device=config.run.device)
    result = d2r.augment(
        args.src, num_images=args.num_images, seed=config.run.seed, identity=args.identity
    )
    result.save(args.out)
    print(f"{len(result.images)} images ({len(result.rejected)} rejected) -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from digi2real.runner.demo import run_demo

    for line in run_demo(args.out, weights=args.weights, quiet=args.quiet):
        print(line)
    print(TINY_NOTICE)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert a dataset (one folder per identity)")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    add_config_flags(p)
    p.add_argument("--outputs-per-identity", type=int)
    p.add_argument("--formats", help="comma list: imagefolder,webdataset,recordio")
    p.add_argument("--shard-size", type=int, help="identities per shard")
    p.add_argument("--devices", help="local workers: 0,1 | all | cpux2")
    p.add_argument("--runner", choices=RUNNERS)
    p.add_argument("--ray-address")
    p.add_argument("--source-license", help="licence of the source dataset (dataset card)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT and start over")
    p.add_argument("--dry-run", action="store_true", help="plan and preflight only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("augment", help="new images of ONE identity (folder of images or .npy)")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--identity", default="augment")
    add_config_flags(p, source=False)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("demo", help="tiny profile on the bundled sample (CPU, < 2 minutes)")
    p.add_argument("--out", type=Path, default=Path("digi2real-demo"))
    p.add_argument("--weights", type=Path)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
