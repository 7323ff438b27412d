"""``digi2real weights {download,verify,tiny}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from digi2real.cli.common import EXIT_FAILED


def cmd_weights(args: argparse.Namespace) -> int:
    from digi2real import weights

    directory = args.dir or weights.default_weights_dir(
        "tiny" if args.weights_command == "tiny" else "real"
    )
    if args.weights_command == "tiny":
        built = weights.build_tiny(directory, seed=args.seed, force=args.force)
        print(f"tiny profile built in {built.root} (digest {built.digest[:12]})")
        return 0
    if args.weights_command == "download":
        try:
            groups = weights.parse_groups(args.with_) if args.with_ else ()
            result = weights.download(directory, token=args.token, with_=groups)
        except weights.NoNetworkError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_FAILED
    else:
        result = weights.verify(directory)
    if result.ok:
        print(f"ok: {result.checked} files verified in {result.root}")
        return 0
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_FAILED


def register(sub: Any) -> None:
    p = sub.add_parser("weights", help="download, verify or build weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    for name, text in (
        ("download", "fetch the real weights (needs network)"),
        ("verify", "check sizes and checksums"),
        ("tiny", "build the tiny random-weight profile"),
    ):
        q = wsub.add_parser(name, help=text)
        q.add_argument(
            "--dir", type=Path, help="weights dir (default: $DIGI2REAL_HOME/weights/...)"
        )
        if name == "download":
            q.add_argument("--token", help="Hugging Face token (if a repo needs one)")
            q.add_argument(
                "--with",
                dest="with_",
                metavar="LIST",
                help="optional components too: comma list of lcm (LCM-LoRA), tcd (TCD-LoRA), "
                "taesd (tiny decoder), landmarks3d (1k3d68: *_3d_est pose), genderage "
                "(age_est, gender_est), or all (preset fast4 needs lcm,taesd)",
            )
        if name == "tiny":
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--force", action="store_true")
        q.set_defaults(func=cmd_weights)
