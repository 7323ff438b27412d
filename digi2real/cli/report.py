"""``digi2real report`` and ``digi2real prune``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digi2real.cli.common import add_config_flags, config_from_args


def cmd_report(args: argparse.Namespace) -> int:
    from digi2real.analysis.report import run_report
    from digi2real.data.store import location

    needs_models = (
        (args.source is not None and args.source.suffix != ".npy")
        or (args.gallery is not None and location(args.gallery).suffix != ".npy")
        or args.judge is not None
        or args.config is not None
        or args.pose
    )
    judge = {"report.recognizer": ("--judge", args.judge)}
    config = config_from_args(args, **judge) if needs_models else None
    summary = run_report(
        args.out,
        gallery=args.gallery,
        html=args.html,
        source=args.source,
        config=config,
        embed_images=args.embed_images,
        pose=args.pose,
        thresholds={
            "collision_threshold": args.collision_threshold,
            "leak_threshold": args.leak_threshold,
            "duplicate_threshold": args.duplicate_threshold,
        },
    )
    print(summary)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from digi2real.analysis.prune import prune_dataset

    print(
        prune_dataset(
            args.out, args.dest, args.drop_collisions, args.drop_leaks, args.keys_only, args.copy
        )
    )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="dataset report (consistency, collisions, leakage)")
    p.add_argument("out", nargs="?", help="a converted dataset (path or URL)")
    p.add_argument("--gallery", help="real identities: folder of images or .npy (path or URL)")
    p.add_argument("--source", type=Path, help="check a SOURCE dataset before converting")
    p.add_argument("--html", action="store_true", help="also write report/index.html")
    p.add_argument("--embed-images", action="store_true", help="inline images in the HTML")
    p.add_argument(
        "--pose",
        action="store_true",
        help="yaw/pitch of renders and outputs from the detector's landmarks (needs weights)",
    )
    p.add_argument(
        "--judge",
        type=Path,
        help="a stricter ONNX recognizer for the report (preprocessing: report.* in --config)",
    )
    p.add_argument("--collision-threshold", type=float, help="centroid cosine (default 0.6)")
    p.add_argument(
        "--leak-threshold", type=float, help="cosine to a gallery identity (default 0.5)"
    )
    p.add_argument("--duplicate-threshold", type=float, help="within-identity (default 0.95)")
    add_config_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prune", help="copy a dataset without collisions/leaks")
    p.add_argument("out", type=Path, help="a converted dataset")
    p.add_argument("dest", type=Path, help="where the cleaned copy goes (new or empty)")
    p.add_argument(
        "--drop-collisions", action="store_true", help="drop the higher label of each pair"
    )
    p.add_argument("--drop-leaks", action="store_true", help="drop identities matching the gallery")
    p.add_argument("--keys-only", action="store_true", help="only write kept_keys.txt")
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking")
    p.set_defaults(func=cmd_prune)
