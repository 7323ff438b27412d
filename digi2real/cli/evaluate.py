"""``digi2real evaluate {train,verify}``: train a recognizer on OUT, verification on .bin sets.

``python -m digi2real evaluate train ...`` is also what ``torchrun -m`` launches.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from digi2real.evaluate.train import add_train_arguments, config_from_args, train
from digi2real.evaluate.verify import add_verify_arguments, run_from_args


def _run_train(args: argparse.Namespace) -> int:
    logging.getLogger("digi2real.evaluate").setLevel(logging.INFO)  # per-epoch progress
    result = train(config_from_args(args))
    return 0 if result.finished or args.max_steps is not None else 1


def _run_verify(args: argparse.Namespace) -> int:
    logging.getLogger("digi2real.evaluate").setLevel(logging.INFO)
    run_from_args(args)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="train / verify a recognizer on a converted dataset")
    esub = p.add_subparsers(dest="evaluate_command", required=True)
    train_parser = esub.add_parser("train", help="train a recogniser on a converted OUT/")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=_run_train)
    verify_parser = esub.add_parser("verify", help="verification accuracy on .bin sets")
    add_verify_arguments(verify_parser)
    verify_parser.set_defaults(func=_run_verify)
