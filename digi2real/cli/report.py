"""``digi2real report`` and ``digi2real prune``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digi2real.cli.common import add_config_flags, config_from_args, three_floats
from digi2real.config import COLORS


def cmd_report(args: argparse.Namespace) -> int:
    from digi2real.analysis.report import run_report
    from digi2real.data.store import location

    needs_models = (
        (args.source is not None and args.source.suffix != ".npy")
        or (args.gallery is not None and location(args.gallery).suffix != ".npy")
        or args.judge is not None
        or args.config is not None
        or args.weights is not None
        or args.pose
    )
    if args.compare and args.out is not None:
        raise ValueError("give the runs to compare after --compare, not OUT as well")
    judge = {"report.recognizer": ("--judge", args.judge)}
    config = config_from_args(args, **judge) if needs_models else None
    features = None
    if args.features is not None:
        from digi2real.analysis.report import features_embedder

        features = features_embedder(
            args.features,
            input_size=args.features_size,
            color=args.features_color,
            mean=args.features_mean,
            std=args.features_std,
            config=config,
        )
    summary = run_report(
        args.out,
        gallery=args.gallery,
        html=args.html,
        source=args.source,
        config=config,
        embed_images=args.embed_images,
        pose=args.pose,
        features=features,
        compare=args.compare,
        compare_out=args.compare_out,
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
    p = sub.add_parser(
        "report",
        help="dataset report (consistency, collisions, leakage, domain gap, runs compared)",
    )
    p.add_argument("out", nargs="?", help="a converted dataset (path or URL)")
    p.add_argument(
        "--gallery",
        help="real identities: folder of images or .npy (path or URL); .npy rows that are not "
        "unit-norm are normalised (one warning), NaN or zero rows refused",
    )
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
    p.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        metavar="OUT",
        help="several converted datasets side by side: figures and the settings that differ",
    )
    p.add_argument(
        "--compare-out",
        type=Path,
        help="where compare.json/.html go (default: the first run's report/)",
    )
    features = p.add_argument_group(
        "features", "the domain gap in an image encoder's space too (needs --gallery FOLDER)"
    )
    features.add_argument("--features", type=Path, help="an ONNX image encoder (DINOv2, CLIP...)")
    features.add_argument("--features-size", type=int, help="its input side (default 224)")
    features.add_argument("--features-color", choices=COLORS, help="its channel order (RGB)")
    features.add_argument(
        "--features-mean",
        type=three_floats,
        help="a,b,c (default ImageNet's 123.675,116.28,103.53)",
    )
    features.add_argument(
        "--features-std", type=three_floats, help="a,b,c (default ImageNet's 58.395,57.12,57.375)"
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
