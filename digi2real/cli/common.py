"""What several command groups share: config flags, grouped by what they set, and how they
become a validated Config. A command adds only the groups it uses."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digi2real.config import (
    DECODERS,
    DTYPES,
    FRAMES,
    GEOMETRY,
    SAMPLERS,
    SHIFT_METHODS,
    SHIFT_POSITIONS,
    SOURCE_LAYOUTS,
)

# exit codes: 0 success, 1 a run that failed, 2 usage or config errors, 130 Ctrl-C (128 +
# SIGINT, what a shell reports for an interrupted command)
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

TINY_NOTICE = (
    "NOTE: the tiny profile has RANDOM weights: its 'faces' are noise that only prove the "
    "pipeline runs end to end. For real images: `digi2real weights download --dir DIR` (needs "
    "network; see README 'Weights'), then `digi2real convert SRC OUT --weights DIR`."
)

# flag -> (config field it sets, argparse options), per group
FLAGS: dict[str, dict[str, tuple[str | None, dict[str, Any]]]] = {
    "model": {
        "--config": (None, {"type": Path, "help": "YAML config file (see configs/)"}),
        "--preset": (None, {"help": "a preset in configs/: default (paper), fast, tiny..."}),
        "--weights": (
            "weights",
            {"help": "weights dir or URL (digi2real weights download / tiny)"},
        ),
        "--device": ("run.device", {"help": "auto | cpu | cuda | cuda:N"}),
        "--threads": (
            "run.torch_threads",
            {
                "type": int,
                "help": "torch CPU threads per worker (default 1: host-independent bytes)",
            },
        ),
    },
    "source": {
        "--identities": (
            "source.identities",
            {"help": "all | first:N | START:STOP | a,b,c | @names.txt"},
        ),
        "--min-images": (
            "source.min_images",
            {"type": int, "help": "minimum usable images per identity"},
        ),
    },
    "attributes": {
        "--layout": (
            "source.layout",
            {
                "choices": SOURCE_LAYOUTS,
                "help": "SRC's layout: folders (one per identity), facesynthetics, synthface "
                "(default auto: from the file names)",
            },
        ),
        "--attributes": (
            "source.attributes",
            {"help": "per-image attribute table (CSV, Parquet, JSON Lines; keyed by 'path')"},
        ),
        "--where": (
            "attributes.where",
            {"help": "keep the source images whose attributes satisfy it, e.g. 'abs(yaw) > 30'"},
        ),
        "--balance": (
            "attributes.balance",
            {"help": "COLUMN[:BINS] or COLUMN:E0,E1,..: spread each identity's outputs over bins"},
        ),
        "--estimate-attributes": (
            "attributes.estimate",
            {
                "action": "store_true",
                "default": None,
                "help": "estimate yaw, pitch, roll, face size, sharpness, brightness (*_est)",
            },
        ),
        "--geometry": (
            "attributes.geometry",
            {"choices": GEOMETRY, "help": "carry landmarks and masks: auto | carry | off"},
        ),
        "--frame": (
            "output.frame",
            {"choices": FRAMES, "help": "outputs and their labels: crop (112) or generation"},
        ),
    },
    "generation": {
        "--seed": ("run.seed", {"type": int, "help": "run seed"}),
        "--batch-size": (
            "generation.batch_size",
            {"type": int, "help": "targets per UNet call (speed only)"},
        ),
        "--dtype": ("generation.dtype", {"choices": DTYPES}),
        "--sampler": (
            "generation.sampler",
            {"choices": SAMPLERS, "help": "dpmsolver++ (paper), or lcm / tcd with --lora"},
        ),
        "--steps": ("generation.steps", {"type": int, "help": "sampler steps (lcm/tcd: 1-8)"}),
        "--lora": (
            "generation.lora",
            {"help": "LoRA fused into the UNet: lcm | tcd (weights components) or a file"},
        ),
        "--lora-scale": ("generation.lora_scale", {"type": float, "help": "LoRA strength"}),
        "--decoder": (
            "generation.decoder",
            {"choices": DECODERS, "help": "vae (SD-1.5) or tiny (TAESD, cheaper)"},
        ),
        "--guidance": ("generation.guidance", {"type": float, "help": "classifier-free guidance"}),
        "--init-strength": (
            "generation.init_strength",
            {
                "type": float,
                "help": "start from each target's render, noised this far (0 = from noise)",
            },
        ),
        "--threshold": (
            "filter.threshold",
            {"type": float, "help": "identity filter: min cosine to the target"},
        ),
        "--max-attempts": (
            "filter.max_attempts",
            {"type": int, "help": "seeds tried per target before it is rejected"},
        ),
    },
    "shift": {
        "--shift-method": ("shift.method", {"choices": SHIFT_METHODS}),
        "--shift-alpha": ("shift.alpha", {"type": float, "help": "strength (0 = off)"}),
        "--shift-positions": ("shift.positions", {"choices": SHIFT_POSITIONS}),
        "--real-stats": ("shift.real_stats", {"help": "digi2real stats real (path or URL)"}),
        "--synthetic-stats": (
            "shift.synthetic_stats",
            {"help": "digi2real stats synthetic (path or URL)"},
        ),
        "--no-shift": (None, {"action": "store_true", "help": "run without the domain shift"}),
    },
}


def three_floats(text: str) -> tuple[float, float, float]:
    """An argparse type: ``a,b,c`` (a per-channel mean or std)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values[0], values[1], values[2]


def add_config_flags(parser: argparse.ArgumentParser, *groups: str) -> None:
    """Add the flags of ``groups`` (``model`` always) under one "config" heading."""
    section = parser.add_argument_group("config")
    for group in ("model", *groups):
        for flag, (_, options) in FLAGS[group].items():
            section.add_argument(flag, **options)


def config_from_args(args: argparse.Namespace, **extra: tuple[str, Any]) -> Any:
    """The validated Config of ``args``: a YAML file (``--config``) or a preset, with every flag
    the command has applied; ``extra`` adds command-specific fields as ``{dotted: (label,
    value)}``. A bad value is a ConfigError naming the flag."""
    from digi2real.api import resolve_config
    from digi2real.weights import default_weights_dir

    weights = getattr(args, "weights", None)
    if weights is not None:
        # a mistyped --weights is named as such, not as what the preset then lacks
        require_weights(weights)
    config = resolve_config(args.config, preset=args.preset, weights_dir=weights)
    if weights is None and config.weights is None:
        weights = default_weights_dir("tiny" if config.preset == "tiny" else "real")
    overrides: dict[str, Any] = {"weights": str(weights) if weights else None}
    labels: dict[str, str] = {"weights": "--weights"}
    for group in FLAGS.values():
        for flag, (field, _) in group.items():
            value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
            if field is None or field == "weights" or value is None:
                continue
            overrides[field] = str(value) if isinstance(value, Path) else value
            labels[field] = flag
    for field, (label, value) in extra.items():
        if value is not None:
            overrides[field] = str(value) if isinstance(value, Path) else value
            labels[field] = label
    config = config.override(overrides, where="command line", labels=labels)
    if getattr(args, "no_shift", False):
        config = config.override(
            {"shift.method": "none", "shift.alpha": 0.0, "shift.required": False}
        )
    return config


def require_weights(weights: str | Path) -> None:
    """A local ``--weights`` dir that is not one is a one-line error naming it (a URL is
    checked when it is fetched)."""
    from digi2real.data.store import is_url
    from digi2real.weights import DIR_MANIFEST, open_weights

    if not is_url(str(weights)) and not (Path(weights) / DIR_MANIFEST).is_file():
        open_weights(str(weights))  # raises the error that says how to get weights


def is_tiny(weights: str | None) -> bool:
    from digi2real.weights import open_weights

    return weights is not None and open_weights(weights).profile == "tiny"
