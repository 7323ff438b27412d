"""Start-up cost of commands that load no model: `digi2real --help`, `weights verify` on the
tiny profile, and `report` on an existing tiny conversion.

    python scripts/bench_startup.py [--repeat 5] [--json FILE]

Each command runs in a fresh interpreter (`python -X importtime -m digi2real ...`): the
import time is the sum of the top-level imports' cumulative times Python reports, the wall
time is the whole command. Also lists which model libraries (torch, diffusers, transformers,
onnxruntime, insightface) each command imported: the target is none, and < 1 s of imports.
The tiny weights and the conversion are built first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "onnxruntime", "insightface")
TARGET_SECONDS = 1.0
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, set[str], int]:
    """(import seconds, wall seconds, top-level modules imported, exit code)."""
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "digi2real", *argv],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - begin
    total_us, packages = 0, set()
    for line in done.stderr.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        cumulative, indent, module = int(match.group(2)), match.group(3), match.group(4)
        packages.add(module.split(".")[0])
        if not indent:  # a top-level import (Python indents nested ones further)
            total_us += cumulative
    return total_us / 1e6, wall, packages, done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        weights, out = Path(tmp) / "weights", Path(tmp) / "out"
        from digi2real.config import Config
        from digi2real.runner.convert import convert
        from digi2real.sample import digiface_root
        from digi2real.weights import build_tiny

        build_tiny(weights)
        config = Config.preset_named("tiny").override(
            {
                "weights": str(weights),
                "source.root": str(digiface_root()),
                "generation.steps": 2,
                "source.identities": "first:2",
            }
        )
        convert(config, out, progress=False)
        commands = {
            "--help": ["--help"],
            "weights verify": ["weights", "verify", "--dir", str(weights)],
            "report OUT": ["report", str(out)],
        }
        results = {}
        for name, argv in commands.items():
            run(argv, env)  # warm the file cache and bytecode
            samples = [run(argv, env) for _ in range(args.repeat)]
            imports = statistics.median(s[0] for s in samples)
            results[name] = {
                "import_seconds": round(imports, 3),
                "wall_seconds": round(statistics.median(s[1] for s in samples), 3),
                "model_libraries_imported": sorted(set(MODEL_LIBRARIES) & samples[0][2]),
                "exit_code": samples[0][3],
                "passed": imports < TARGET_SECONDS
                and not (set(MODEL_LIBRARIES) & samples[0][2])
                and samples[0][3] == 0,
            }
    width = max(len(name) for name in results)
    print(f"{'command':<{width}}  imports  wall    model libraries  exit  < {TARGET_SECONDS:g} s")
    for name, row in results.items():
        print(
            f"{name:<{width}}  {row['import_seconds']:6.3f}s  {row['wall_seconds']:5.2f}s  "
            f"{','.join(row['model_libraries_imported']) or 'none':<15}  {row['exit_code']:>4}  "
            f"{'yes' if row['passed'] else 'NO'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(row["passed"] for row in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
