"""``digi2real embed`` and ``digi2real stats``: embeddings and domain-shift statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digi2real.cli.common import add_config_flags, config_from_args
from digi2real.config import SHIFT_METHODS, SHIFT_POSITIONS


def cmd_embed(args: argparse.Namespace) -> int:
    from digi2real.face.images import embed_to_file
    from digi2real.face.stack import FaceStack

    config = config_from_args(args)
    embedded, errors = embed_to_file(
        FaceStack.from_config(config), args.src, args.out, select=config.source.identities
    )
    print(f"{embedded} embeddings ({errors} unusable files) -> {args.out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from digi2real.pipeline import domain_shift
    from digi2real.pipeline.shift_stats import compute_stats_from

    if args.stats_command in ("real", "synthetic"):
        config = config_from_args(args)
        stats = compute_stats_from(config, args.src, args.stats_command, args.out)
        print(f"{args.stats_command} stats of {stats.count} faces -> {args.out}")
    elif args.stats_command == "merge":
        merged = domain_shift.merge_stats(args.inputs)
        merged.save(args.out)
        print(f"merged {len(args.inputs)} files ({merged.count} faces) -> {args.out}")
    else:
        print(
            domain_shift.compare_files(
                args.real,
                args.synthetic,
                method=args.method,
                alpha=args.alpha,
                positions=args.positions,
                png=args.png,
            )
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="ArcFace embeddings of a dataset -> FILE.npy (+ rows)")
    p.add_argument("src", type=Path, help="a dataset: one folder of images per identity")
    p.add_argument("--out", type=Path, required=True, help="FILE.npy (FILE.rows.parquet beside)")
    add_config_flags(p, "source")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("stats", help="domain-shift statistics")
    ssub = p.add_subparsers(dest="stats_command", required=True)
    for kind in ("real", "synthetic"):
        q = ssub.add_parser(kind, help=f"statistics of {kind} faces (images folder or .npy)")
        q.add_argument("src", type=Path, help="a folder of face images (any depth) or a .npy")
        q.add_argument("--out", type=Path, required=True, help="the stats file to write")
        add_config_flags(q)
        q.set_defaults(func=cmd_stats)
    q = ssub.add_parser("merge", help="merge stats files (Chan's formula)")
    q.add_argument("inputs", type=Path, nargs="+", help="stats files of one kind and encoder")
    q.add_argument("--out", type=Path, required=True, help="the merged stats file")
    q.set_defaults(func=cmd_stats)
    q = ssub.add_parser("compare", help="the gap before/after correction (text + PNG)")
    q.add_argument("real", type=Path, help="real-face stats file")
    q.add_argument("synthetic", type=Path, help="synthetic-face stats file")
    q.add_argument(
        "--method", default="mean_shift", choices=[m for m in SHIFT_METHODS if m != "none"]
    )
    q.add_argument("--alpha", type=float, default=1.0, help="strength of the correction")
    q.add_argument("--positions", default="all", choices=SHIFT_POSITIONS)
    q.add_argument("--png", type=Path, help="also plot the gap to this PNG")
    q.set_defaults(func=cmd_stats)
