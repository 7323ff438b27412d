"""Byte-compare a fixed tiny conversion made by two versions of the code.

    python scripts/compare_outputs.py BASE_REV [--head REV] [--keep DIR]

BASE_REV's tree (``git archive``) and HEAD's (the working tree as it is, or ``--head REV``)
each run, in this one environment and on this one machine, the same conversions of the
bundled sample with the same tiny weights (built once, by the head code):

1. ``stats synthetic`` / ``stats real`` of the sample (the stats tensors must be identical);
2. a conversion with all three formats and ``keep_original``;
3. a conversion with the domain shift on (``mean_shift``, alpha 1) from those stats;
4. ``report`` on the first conversion.

It then compares, per conversion: every file under ``images/``, ``originals/``, ``wds/`` and
``rec/`` byte for byte, the data columns of ``manifest.parquet``, ``rejected.parquet`` and
``errors.parquet``, ``labels.csv``, and ``report/report.json``. Exit 0 when all are equal,
1 with the differences listed. Nothing in the repository is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BYTE_FOLDERS = ("images", "originals", "wds", "rec")
TABLES = ("manifest.parquet", "rejected.parquet", "errors.parquet")
TEXT_FILES = ("labels.csv", "report/report.json")
# the package version may differ between the two trees; every other column is data
IGNORED_COLUMNS = ("version",)


def export_tree(rev: str, dest: Path) -> Path:
    """The files of ``rev`` under ``dest`` (no git metadata, the repo untouched)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev],
        check=True,
        capture_output=True,
    ).stdout
    tar_path = dest.parent / f"{dest.name}.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="tar")
    tar_path.unlink()
    return dest


def digi2real(tree: Path, *args: str) -> None:
    """Run the ``digi2real`` command of the code in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    code = "import sys; from digi2real.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, cwd=tree)


def sample_root(tree: Path) -> Path:
    return tree / "digi2real" / "sample" / "digiface"


def run_version(tree: Path, work: Path, weights: Path) -> dict[str, Path]:
    """The conversions of one version; returns {name: OUT}."""
    sample = sample_root(tree)
    work.mkdir(parents=True, exist_ok=True)
    model = ["--weights", str(weights), "--preset", "tiny"]
    common = [*model, "--seed", "7"]
    stats = {}
    for kind in ("synthetic", "real"):
        stats[kind] = work / f"{kind}.stats"
        digi2real(tree, "stats", kind, str(sample), "--out", str(stats[kind]), *model)
    outs = {"formats": work / "formats", "shift": work / "shift"}
    config = yaml.safe_load((tree / "digi2real" / "configs" / "tiny.yaml").read_text())
    config["output"].update(formats=["imagefolder", "webdataset", "recordio"], keep_original=True)
    formats_yaml = work / "formats.yaml"
    formats_yaml.write_text(yaml.safe_dump(config))
    digi2real(
        tree,
        "convert",
        str(sample),
        str(outs["formats"]),
        *common,
        "--config",
        str(formats_yaml),
        "--quiet",
    )
    digi2real(
        tree,
        "convert",
        str(sample),
        str(outs["shift"]),
        *common,
        "--shift-method",
        "mean_shift",
        "--shift-alpha",
        "1.0",
        "--real-stats",
        str(stats["real"]),
        "--synthetic-stats",
        str(stats["synthetic"]),
        "--quiet",
    )
    digi2real(tree, "report", str(outs["formats"]))
    return {**outs, **{f"stats_{k}": v for k, v in stats.items()}}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_files(base: Path, head: Path, label: str) -> list[str]:
    if not base.exists() and not head.exists():
        return []
    if base.is_file() or head.is_file():
        same = base.is_file() and head.is_file() and _digest(base) == _digest(head)
        return [] if same else [f"{label}: differs"]
    base_files = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    head_files = {p.relative_to(head).as_posix() for p in head.rglob("*") if p.is_file()}
    problems = [f"{label}/{p}: only in base" for p in sorted(base_files - head_files)]
    problems += [f"{label}/{p}: only in head" for p in sorted(head_files - base_files)]
    problems += [
        f"{label}/{p}: bytes differ"
        for p in sorted(base_files & head_files)
        if _digest(base / p) != _digest(head / p)
    ]
    return problems


def compare_table(
    base: Path, head: Path, label: str, ignored: tuple[str, ...] = IGNORED_COLUMNS
) -> list[str]:
    import pyarrow.parquet as pq

    if not base.is_file() or not head.is_file():
        return [f"{label}: missing in {'base' if not base.is_file() else 'head'}"]
    old, new = pq.read_table(base), pq.read_table(head)
    problems = []
    old_cols = [c for c in old.column_names if c not in ignored]
    new_cols = [c for c in new.column_names if c not in ignored]
    if old_cols != new_cols:
        problems.append(f"{label}: columns {old_cols} -> {new_cols}")
    for column in sorted(set(old_cols) & set(new_cols)):
        if old.column(column).to_pylist() != new.column(column).to_pylist():
            problems.append(f"{label}: column {column!r} differs")
    return problems


def compare_stats(base: Path, head: Path, label: str) -> list[str]:
    """The statistics of two stats files. Their metadata names the paths and the command line
    that made them, and the plot samples are drawn by priorities keyed on the source path,
    so those differ between the two runs by design."""
    import numpy as np
    from safetensors.numpy import load_file

    old, new = load_file(base), load_file(head)
    return [
        f"{label}: tensor {k!r} differs"
        for k in ("count", "mean", "m2")
        if k not in old or k not in new or not np.array_equal(old[k], new[k])
    ]


def compare_json(base: Path, head: Path, label: str) -> list[str]:
    if not base.is_file() or not head.is_file():
        return [f"{label}: missing in {'base' if not base.is_file() else 'head'}"]
    old = json.loads(base.read_text(encoding="utf-8"))
    new = json.loads(head.read_text(encoding="utf-8"))
    for record in (old, new):
        record.pop("version", None)
    return [] if old == new else [f"{label}: differs"]


def compare(
    base: dict[str, Path], head: dict[str, Path], ignored: tuple[str, ...] = IGNORED_COLUMNS
) -> list[str]:
    problems = []
    for kind in ("stats_real", "stats_synthetic"):
        problems += compare_stats(base[kind], head[kind], kind)
    for name in ("formats", "shift"):
        for folder in BYTE_FOLDERS:
            problems += compare_files(base[name] / folder, head[name] / folder, f"{name}/{folder}")
        for table in TABLES:
            problems += compare_table(
                base[name] / table, head[name] / table, f"{name}/{table}", ignored
            )
        problems += compare_files(
            base[name] / "labels.csv", head[name] / "labels.csv", f"{name}/labels.csv"
        )
    report = "report/report.json"
    problems += compare_json(
        base["formats"] / report, head["formats"] / report, f"formats/{report}"
    )
    return problems


def summary(outs: dict[str, Path]) -> str:
    import pyarrow.parquet as pq

    rows = pq.read_table(outs["formats"] / "manifest.parquet").num_rows
    files = sum(
        1 for folder in BYTE_FOLDERS for p in (outs["formats"] / folder).rglob("*") if p.is_file()
    )
    return f"{rows} manifest rows, {files} files in {', '.join(BYTE_FOLDERS)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the base commit (e.g. 2606f0a)")
    parser.add_argument("--head", help="a commit to compare (default: the working tree)")
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    parser.add_argument(
        "--ignore-columns",
        default="",
        help="comma list of table columns a change adds or removes on purpose",
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="digi2real-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    base_tree = export_tree(args.base, work / "base-tree")
    head_tree = export_tree(args.head, work / "head-tree") if args.head else REPO
    weights = work / "weights"
    digi2real(head_tree, "weights", "tiny", "--dir", str(weights))
    base_outs = run_version(base_tree, work / "base", weights)
    head_outs = run_version(head_tree, work / "head", weights)
    ignored = IGNORED_COLUMNS + tuple(c for c in args.ignore_columns.split(",") if c)
    problems = compare(base_outs, head_outs, ignored)
    print(f"base {args.base}: {summary(base_outs)}")
    print(f"head {args.head or 'working tree'}: {summary(head_outs)}")
    if problems:
        print(f"{len(problems)} difference(s):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(
        "identical: images/, originals/, wds/, rec/, manifest/rejected/errors data columns, "
        "labels.csv, stats tensors and report.json"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
