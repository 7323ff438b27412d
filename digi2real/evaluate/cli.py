"""``digi2real evaluate {train,verify}``: mountable into the main CLI, or run as a module.

``python -m digi2real.evaluate train ...`` is also what ``torchrun -m`` launches.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from digi2real.evaluate.train import add_train_arguments, config_from_args, train
from digi2real.evaluate.verify import add_verify_arguments, run_from_args


def add_evaluate_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``verify`` to ``subparsers``; each sets ``args.func``."""
    train_parser = subparsers.add_parser("train", help="train a recogniser on a converted OUT/")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=_run_train)
    verify_parser = subparsers.add_parser("verify", help="verification accuracy on .bin sets")
    add_verify_arguments(verify_parser)
    verify_parser.set_defaults(func=_run_verify)


def _run_train(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    return 0 if result.finished or args.max_steps is not None else 1


def _run_verify(args: argparse.Namespace) -> int:
    run_from_args(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digi2real evaluate")
    add_evaluate_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
