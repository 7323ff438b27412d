"""The ``digi2real`` command: the parser assembled from one module per command group, logging,
and the mapping of failures to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from digi2real.cli import bench, convert, embed, evaluate, report, weights
from digi2real.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from digi2real.data.store import redact_logs
from digi2real.runner.faults import LOG_LEVEL_ENV
from digi2real.version import __version__

GROUPS = (convert, embed, weights, report, evaluate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digi2real",
        description="Synthetic face renders -> photorealistic, identity-preserving FR training sets.",
    )
    parser.add_argument("--version", action="version", version=f"digi2real {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


# what a user can fix by changing the command: bad values, missing inputs, a missing extra
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    redact_logs()  # no credential value from the environment reaches a log line
    _configure_environment(level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USAGE_ERRORS as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED


def _configure_environment(level: int) -> None:
    """Settings read by libraries and worker processes when (if) they start: importing
    diffusers or transformers here to quieten them would cost seconds on every command."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # local workers and Ray actors inherit DIGI2REAL_* settings: -v reaches them too
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
