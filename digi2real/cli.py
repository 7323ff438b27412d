"""The ``digi2real`` command. Maps flags onto the config and calls the library; no logic."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digi2real import __version__

logger = logging.getLogger("digi2real")

TINY_NOTICE = (
    "NOTE: the tiny profile has RANDOM weights: its 'faces' are noise that only prove the "
    "pipeline runs end to end. For real images: `digi2real weights download --dir DIR` (needs "
    "network; see README 'Weights'), then `digi2real convert SRC OUT --weights DIR`."
)


# ---------------------------------------------------------------------------------------------
# shared flag groups
# ---------------------------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser, *, source: bool = True) -> None:
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
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--threshold", type=float, help="identity filter: min cosine to the target")
    g.add_argument("--max-attempts", type=int)
    g.add_argument("--shift-method", choices=("none", "mean_shift", "moment_match"))
    g.add_argument("--shift-alpha", type=float)
    g.add_argument("--shift-positions", choices=("all", "varying"))
    g.add_argument("--real-stats", type=Path)
    g.add_argument("--synthetic-stats", type=Path)
    g.add_argument("--no-shift", action="store_true", help="run without the domain shift")


def _config_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    from digi2real.config import Config
    from digi2real.weights import default_weights_dir, open_weights

    weights = args.weights
    if args.config is not None:
        config = Config.from_yaml(args.config)
    else:
        preset = args.preset
        if preset is None:
            root = weights or default_weights_dir("real")
            profile = (
                open_weights(root).profile if (Path(root) / "manifest.json").is_file() else "real"
            )
            preset = "tiny" if profile == "tiny" else "default"
        config = Config.preset_named(preset)
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


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from digi2real.env import check_environment
    from digi2real.runner.convert import convert, preflight

    check_environment()
    formats = args.formats.split(",") if args.formats else None
    config = _config_from_args(
        args,
        **{
            "source.root": str(args.src),
            "source.license": args.source_license,
            "interpolation.outputs_per_identity": args.outputs_per_identity,
            "output.formats": formats,
            "output.shard_size": args.shard_size,
            "run.devices": args.devices,
            "run.runner": args.runner,
            "run.ray_address": args.ray_address,
        },
    ).validate()
    if args.dry_run:
        report = preflight(config, args.out)
        width = max(len(k) for k in report)
        for key, value in report.items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
        return 0
    start = time.perf_counter()
    summary = convert(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"done in {time.perf_counter() - start:.1f}s")
    for line in summary.lines():
        print(line)
    if config.weights and _is_tiny(config.weights):
        print(TINY_NOTICE)
    return 0


def _is_tiny(weights: str) -> bool:
    from digi2real.weights import open_weights

    return open_weights(weights).profile == "tiny"


def cmd_augment(args: argparse.Namespace) -> int:
    from digi2real.api import Digi2Real
    from digi2real.data.images import encode_jpeg

    config = _config_from_args(args)
    d2r = Digi2Real.from_pretrained(config.weights, config=config, device=config.run.device)
    result = d2r.augment(
        args.src, num_images=args.num_images, seed=config.run.seed, identity=args.identity
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in result.images:
        name = f"{item.metadata['index']:04d}.jpg"
        (args.out / name).write_bytes(encode_jpeg(item.image))
        rows.append({"file": name, **item.metadata})
    (args.out / "metadata.json").write_text(
        json.dumps({"images": rows, "rejected": result.rejected}, indent=2)
    )
    print(f"{len(result.images)} images ({len(result.rejected)} rejected) -> {args.out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from digi2real.tools import embed_dataset

    config = _config_from_args(args)
    result = embed_dataset(config, args.src, args.out)
    print(f"{result['embedded']} embeddings ({result['errors']} unusable files) -> {args.out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from digi2real import tools

    if args.stats_command in ("real", "synthetic"):
        config = _config_from_args(args)
        stats = tools.compute_stats_for(config, args.src, args.stats_command, args.out)
        print(f"{args.stats_command} stats of {stats.count} faces -> {args.out}")
        return 0
    if args.stats_command == "merge":
        from digi2real.domain_shift import merge_stats

        merged = merge_stats(args.inputs)
        merged.save(args.out)
        print(f"merged {len(args.inputs)} files ({merged.count} faces) -> {args.out}")
        return 0
    if args.stats_command == "compare":
        text = tools.compare_stats(
            args.real,
            args.synthetic,
            method=args.method,
            alpha=args.alpha,
            positions=args.positions,
            png=args.png,
        )
        print(text)
        return 0
    raise AssertionError(args.stats_command)


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
            result = weights.download(directory, token=args.token)
        except weights.NoNetworkError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        result = weights.verify(directory)
    if result.ok:
        print(f"ok: {result.checked} files verified in {result.root}")
        return 0
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from digi2real import tools

    needs_models = (
        (args.source is not None and args.source.suffix != ".npy")
        or (args.gallery is not None and args.gallery.suffix != ".npy")
        or args.judge is not None
        or args.config is not None
    )
    judge = {"report.recognizer": str(args.judge) if args.judge else None}
    config = _config_from_args(args, **judge) if needs_models else None
    summary = tools.run_report(
        args.out,
        gallery=args.gallery,
        html=args.html,
        source=args.source,
        config=config,
        embed_images=args.embed_images,
        thresholds={
            "collision_threshold": args.collision_threshold,
            "leak_threshold": args.leak_threshold,
            "duplicate_threshold": args.duplicate_threshold,
        },
    )
    print(summary)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from digi2real import tools

    print(
        tools.run_prune(
            args.out, args.dest, args.drop_collisions, args.drop_leaks, args.keys_only, args.copy
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from digi2real.tools import run_demo

    lines = run_demo(args.out, weights=args.weights, quiet=args.quiet)
    for line in lines:
        print(line)
    print(TINY_NOTICE)
    return 0


def cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from digi2real.evaluate.cli import main as evaluate_main

    return int(evaluate_main(rest) or 0)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digi2real",
        description="Synthetic face renders -> photorealistic, identity-preserving FR training sets.",
    )
    parser.add_argument("--version", action="version", version=f"digi2real {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a dataset (one folder per identity)")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    _add_config_flags(p)
    p.add_argument("--outputs-per-identity", type=int)
    p.add_argument("--formats", help="comma list: imagefolder,webdataset,recordio")
    p.add_argument("--shard-size", type=int, help="identities per shard")
    p.add_argument("--devices", help="local workers: 0,1 | all | cpux2")
    p.add_argument("--runner", choices=("local", "ray"))
    p.add_argument("--ray-address")
    p.add_argument("--source-license", help="licence of the source dataset (dataset card)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT and start over")
    p.add_argument("--dry-run", action="store_true", help="plan and preflight only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("augment", help="new images of ONE identity (folder of images or .npy)")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--identity", default="augment")
    _add_config_flags(p, source=False)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("embed", help="ArcFace embeddings of a dataset -> FILE.npy (+ rows)")
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, required=True)
    _add_config_flags(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("stats", help="domain-shift statistics")
    ssub = p.add_subparsers(dest="stats_command", required=True)
    for kind in ("real", "synthetic"):
        q = ssub.add_parser(kind, help=f"statistics of {kind} faces (images folder or .npy)")
        q.add_argument("src", type=Path)
        q.add_argument("--out", type=Path, required=True)
        _add_config_flags(q)
        q.set_defaults(func=cmd_stats)
    q = ssub.add_parser("merge", help="merge stats files (Chan's formula)")
    q.add_argument("inputs", type=Path, nargs="+")
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=cmd_stats)
    q = ssub.add_parser("compare", help="the gap before/after correction (text + PNG)")
    q.add_argument("real", type=Path)
    q.add_argument("synthetic", type=Path)
    q.add_argument("--method", default="mean_shift", choices=("mean_shift", "moment_match"))
    q.add_argument("--alpha", type=float, default=1.0)
    q.add_argument("--positions", default="all", choices=("all", "varying"))
    q.add_argument("--png", type=Path)
    q.set_defaults(func=cmd_stats)

    p = sub.add_parser("weights", help="download, verify or build weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    for name, text in (
        ("download", "fetch the real weights (needs network)"),
        ("verify", "check sizes and checksums"),
        ("tiny", "build the tiny random-weight profile"),
    ):
        q = wsub.add_parser(name, help=text)
        q.add_argument("--dir", type=Path)
        if name == "download":
            q.add_argument("--token", help="Hugging Face token (if a repo needs one)")
        if name == "tiny":
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--force", action="store_true")
        q.set_defaults(func=cmd_weights)

    p = sub.add_parser("report", help="dataset report (consistency, collisions, leakage)")
    p.add_argument("out", type=Path, nargs="?", help="a converted dataset")
    p.add_argument("--gallery", type=Path, help="real identities: folder of images or .npy")
    p.add_argument("--source", type=Path, help="check a SOURCE dataset before converting")
    p.add_argument("--html", action="store_true", help="also write report/index.html")
    p.add_argument("--embed-images", action="store_true", help="inline images in the HTML")
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
    _add_config_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prune", help="copy a dataset without collisions/leaks")
    p.add_argument("out", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--drop-collisions", action="store_true")
    p.add_argument("--drop-leaks", action="store_true")
    p.add_argument("--keys-only", action="store_true", help="only write kept_keys.txt")
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("demo", help="tiny profile on the bundled sample (CPU, < 2 minutes)")
    p.add_argument("--out", type=Path, default=Path("digi2real-demo"))
    p.add_argument("--weights", type=Path)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "evaluate", help="train / verify a recognizer (see `digi2real evaluate -h`)", add_help=False
    )
    p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "evaluate":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return cmd_evaluate(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["logging"])
            module.set_verbosity_error()
            module.disable_progress_bar()
        except (ImportError, AttributeError):
            continue


if __name__ == "__main__":
    raise SystemExit(main())
