"""``digi2real convert``, ``augment`` and ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from digi2real.cli.common import (
    EXIT_INTERRUPTED,
    TINY_NOTICE,
    add_config_flags,
    config_from_args,
    is_tiny,
)
from digi2real.config import RUNNERS


def cmd_convert(args: argparse.Namespace) -> int:
    from digi2real.env import check_environment
    from digi2real.runner.convert import committed_shards, convert, preflight

    check_environment()
    formats = args.formats.split(",") if args.formats else None
    config = config_from_args(
        args,
        **{
            "source.root": ("SRC", args.src),
            "source.license": ("--source-license", args.source_license),
            "interpolation.outputs_per_identity": (
                "--outputs-per-identity",
                args.outputs_per_identity,
            ),
            "output.formats": ("--formats", formats),
            "output.shard_size": ("--shard-size", args.shard_size),
            "run.devices": ("--devices", args.devices),
            "run.runner": ("--runner", args.runner),
            "run.ray_address": ("--ray-address", args.ray_address),
            "run.num_nodes": ("--num-nodes", args.num_nodes),
            "run.node_rank": ("--node-rank", args.node_rank),
        },
    ).validate()
    if args.dry_run:
        report = preflight(config, args.out, bench_file=args.bench)
        width = max(len(k) for k in report)
        for key, value in report.items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
        return 0
    start = time.perf_counter()
    try:
        summary = convert(
            config,
            args.out,
            overwrite=args.overwrite,
            delete_foreign=args.delete_foreign_files,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        committed, total = committed_shards(args.out)
        print(
            f"interrupted: {committed} of {total} shards committed in {args.out}; re-running "
            "the same command resumes from there",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
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
    p = sub.add_parser(
        "convert", help="convert a dataset (one folder per identity, FaceSynthetics, SynthFace)"
    )
    p.add_argument(
        "src",
        help="the source dataset: one folder of images per identity, or a FaceSynthetics or "
        "SynthFace folder (path or URL)",
    )
    p.add_argument("out", help="the output folder or URL (created; re-run to resume)")
    add_config_flags(p, "source", "attributes", "generation", "shift")
    p.add_argument("--outputs-per-identity", type=int, help="images per identity")
    p.add_argument("--formats", help="comma list: imagefolder,webdataset,recordio")
    p.add_argument("--shard-size", type=int, help="identities per shard")
    p.add_argument("--devices", help="local workers: 0,1 | all | cpux2")
    p.add_argument("--runner", choices=RUNNERS)
    p.add_argument(
        "--ray-address",
        help="a running Ray cluster (default: RAY_ADDRESS, or the cluster `ray start` started "
        "on this machine, else a local one)",
    )
    p.add_argument(
        "--num-nodes",
        type=int,
        help="the same command runs on N nodes (default: SLURM_NTASKS, else WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        help="this node's rank, 0..N-1: it runs shards with index %% N == rank "
        "(default: SLURM_PROCID, else RANK, else 0)",
    )
    p.add_argument("--source-license", help="licence of the source dataset (dataset card)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what digi2real wrote in OUT and start over (refused while OUT holds "
        "files digi2real did not write)",
    )
    p.add_argument(
        "--delete-foreign-files",
        action="store_true",
        help="with --overwrite: also delete the files in OUT that digi2real did not write",
    )
    p.add_argument("--dry-run", action="store_true", help="plan and preflight only")
    p.add_argument(
        "--bench",
        type=Path,
        help="a `digi2real bench` result for --dry-run's GPU-hours (default: the one "
        "`digi2real bench` writes, $DIGI2REAL_HOME/bench.json, if present)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("augment", help="new images of ONE identity (folder of images or .npy)")
    p.add_argument("src", type=Path, help="the identity: a folder of its images or a .npy")
    p.add_argument("--out", type=Path, required=True, help="folder for NNNN.jpg + metadata.json")
    p.add_argument("--num-images", type=int, default=8, help="how many images (default 8)")
    p.add_argument("--identity", default="augment", help="name recorded in the metadata")
    add_config_flags(p, "generation", "shift")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("demo", help="tiny profile on the bundled sample (CPU, < 2 minutes)")
    p.add_argument("--out", type=Path, default=Path("digi2real-demo"))
    p.add_argument("--weights", type=Path, help="tiny weights dir (built there if absent)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
