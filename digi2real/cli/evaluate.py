"""``digi2real evaluate {train,verify}``: train a recognizer on OUT, verification on .bin sets.

``python -m digi2real evaluate train ...`` is also what ``torchrun -m`` launches.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from digi2real.cli.common import three_floats
from digi2real.config import COLORS
from digi2real.evaluate.choices import (
    BACKBONES,
    DATA_FORMATS,
    DEFAULT_NAMES,
    DEFAULT_SCALE,
    LOSSES,
    SCHEDULES,
)

if TYPE_CHECKING:
    from digi2real.evaluate.train import TrainConfig
    from digi2real.evaluate.verify import VerificationReport
    from digi2real.weights.face_config import RecognizerSpec


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate train`` flags; :func:`config_from_args` maps them onto TrainConfig."""
    parser.add_argument("data", help="converted dataset folder (OUT/)")
    parser.add_argument("--out", required=True, help="checkpoint folder (CKPT_DIR)")
    parser.add_argument("--backbone", choices=BACKBONES, default="iresnet50")
    parser.add_argument("--loss", choices=LOSSES, default="arcface")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--schedule", choices=SCHEDULES, default="poly")
    parser.add_argument("--warmup-epochs", type=float, default=0.0)
    parser.add_argument(
        "--milestones", default="", help="epochs where --schedule step multiplies LR by gamma"
    )
    parser.add_argument("--lr-gamma", type=float, default=0.1)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    parser.add_argument("--margin", type=float, default=None, help="0.5 arcface, 0.35 cosface")
    parser.add_argument("--easy-margin", action="store_true")
    parser.add_argument("--clip-grad-norm", type=float, default=5.0, help="0 disables")
    parser.add_argument("--no-flip", dest="flip", action="store_false")
    parser.add_argument("--amp", action="store_true", help="fp16 + GradScaler on CUDA, bf16 on CPU")
    parser.add_argument("--resume", action="store_true", help="require a checkpoint to continue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", dest="num_workers", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (resumably) here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--format", dest="data_format", choices=DATA_FORMATS, default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from digi2real.evaluate.train import TrainConfig

    # the namespace also holds the top-level flags (command, verbose, func): keep only ours
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["milestones"] = tuple(int(m) for m in str(args.milestones).split(",") if m.strip())
    return TrainConfig(**values)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="CKPT_DIR, backbone.safetensors, checkpoint.pt or .onnx")
    parser.add_argument("--bins", required=True, help="folder with <name>.bin files")
    parser.add_argument("--names", default=",".join(DEFAULT_NAMES), help="comma-separated")
    parser.add_argument("--out", default=None, help="Markdown table; JSON beside it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folds", type=int, default=10)
    pre = parser.add_argument_group(
        "preprocessing of an .onnx model",
        "from --face-config, else a face.json next to the model, else ArcFace's "
        "(RGB, mean 127.5, std 127.5, 112); the flags below override it",
    )
    pre.add_argument("--face-config", default=None, help="face.json (or its folder)")
    pre.add_argument("--color", choices=COLORS, default=None, help="channel order the model takes")
    pre.add_argument("--mean", type=three_floats, default=None, help="a,b,c in --color order")
    pre.add_argument("--std", type=three_floats, default=None, help="a,b,c in --color order")
    pre.add_argument("--input-size", type=int, default=None, help="side the images are resized to")


def run_from_args(args: argparse.Namespace) -> VerificationReport:
    from digi2real.evaluate.verify import is_onnx, recognizer_spec, verify

    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if not names:
        raise ValueError("--names is empty")
    flags = {
        "color": args.color,
        "mean": args.mean,
        "std": args.std,
        "input_size": args.input_size,
    }
    spec: RecognizerSpec | None = None
    source: str | None = None
    if is_onnx(args.model):
        spec, source = recognizer_spec(args.model, args.face_config, **flags)
    elif args.face_config is not None or any(v is not None for v in flags.values()):
        raise ValueError(
            "--face-config/--color/--mean/--std/--input-size apply to .onnx models; "
            f"{args.model} is a trained checkpoint, evaluated with its training preprocessing"
        )
    report = verify(
        args.model,
        args.bins,
        names,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        folds=args.folds,
        spec=spec,
        spec_source=source,
    )
    print(report.to_markdown(), end="")
    return report


def _run_train(args: argparse.Namespace) -> int:
    from digi2real.evaluate.train import train

    logging.getLogger("digi2real.evaluate").setLevel(logging.INFO)  # per-epoch progress
    result = train(config_from_args(args))
    # a --max-steps stop is a planned pause (resumable), not a failure
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
