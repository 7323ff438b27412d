"""What several command groups share: the config flags and how they become a Config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digi2real.config import DTYPES, SHIFT_METHODS, SHIFT_POSITIONS

TINY_NOTICE = (
    "NOTE: the tiny profile has RANDOM weights: its 'faces' are noise that only prove the "
    "pipeline runs end to end. For real images: `digi2real weights download --dir DIR` (needs "
    "network; see README 'Weights'), then `digi2real convert SRC OUT --weights DIR`."
)


def add_config_flags(p: argparse.ArgumentParser, *, source: bool = True) -> None:
    g = p.add_argument_group("config")
    g.add_argument("--config", type=Path, help="YAML config file (see configs/)")
    g.add_argument("--preset", help="a preset in configs/: default (paper), fast, tiny")
    g.add_argument("--weights", type=Path, help="weights dir (digi2real weights download/tiny)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, help="run seed")
    if source:
        g.add_argument("--identities", help="all | first:N | START:STOP | a,b,c | @names.txt")
        g.add_argument("--min-images", type=int, help="minimum usable images per identity")
    g.add_argument("--batch-size", type=int, help="targets per UNet call (speed only)")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--threshold", type=float, help="identity filter: min cosine to the target")
    g.add_argument("--max-attempts", type=int)
    g.add_argument("--shift-method", choices=SHIFT_METHODS)
    g.add_argument("--shift-alpha", type=float)
    g.add_argument("--shift-positions", choices=SHIFT_POSITIONS)
    g.add_argument("--real-stats", type=Path)
    g.add_argument("--synthetic-stats", type=Path)
    g.add_argument("--no-shift", action="store_true", help="run without the domain shift")


def config_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    from digi2real.api import resolve_config
    from digi2real.weights import default_weights_dir

    weights = args.weights
    config = resolve_config(args.config, preset=args.preset, weights_dir=weights)
    if weights is None and config.weights is None:
        weights = default_weights_dir("tiny" if config.preset == "tiny" else "real")
    overrides = {
        "weights": str(weights) if weights else None,
        "run.device": args.device,
        "run.seed": args.seed,
        "source.identities": getattr(args, "identities", None),
        "source.min_images": getattr(args, "min_images", None),
        "generation.batch_size": args.batch_size,
        "generation.dtype": args.dtype,
        "generation.steps": args.steps,
        "generation.guidance": args.guidance,
        "filter.threshold": args.threshold,
        "filter.max_attempts": args.max_attempts,
        "shift.method": args.shift_method,
        "shift.alpha": args.shift_alpha,
        "shift.positions": args.shift_positions,
        "shift.real_stats": str(args.real_stats) if args.real_stats else None,
        "shift.synthetic_stats": str(args.synthetic_stats) if args.synthetic_stats else None,
        **extra,
    }
    config = config.override(overrides)
    if args.no_shift:
        config = config.override(
            {"shift.method": "none", "shift.alpha": 0.0, "shift.required": False}
        )
    return config


def is_tiny(weights: str | None) -> bool:
    from digi2real.weights import open_weights

    return weights is not None and open_weights(weights).profile == "tiny"
