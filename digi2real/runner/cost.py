"""What a conversion costs, from measurements only: the rate of a ``digi2real bench`` result
that ran the same generation settings on the same kind of device, and the attempts per target
of an existing OUT. Nothing here assumes an images/s figure; what is not measured is reported
as unknown, with the command that measures it.

A bench result file (``digi2real bench --out FILE``; default :func:`default_bench_file`)::

    {"format": 1, "kind": "digi2real-bench", "device": {"type": "cuda", "name": ...},
     "modes": [{"mode": "fast4", "settings": {sampler, steps, guidance, decoder, lora, dtype,
                batch_size, compile, channels_last}, "method": "end-to-end" | "composed",
                "images_per_s": ..., "flops_per_image": ...}, ...], ...}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digi2real.config import Config
from digi2real.data import layout
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import read_table
from digi2real.device import resolve_dtype

BENCH_FORMAT = 1
BENCH_KIND = "digi2real-bench"
# What a bench mode must share with a run for its rate to apply: the work per image.
WORK_FIELDS = ("sampler", "steps", "guided", "decoder", "dtype")
# Attempts per target when no OUT has measured it: an assumption, always printed as one.
ASSUMED_ATTEMPTS_PER_TARGET = 1.2


def default_bench_file() -> Path:
    """``$DIGI2REAL_HOME/bench.json`` (``~/.cache/digi2real``): where ``digi2real bench``
    writes and ``convert --dry-run`` looks by default."""
    home = Path(os.environ.get("DIGI2REAL_HOME", Path.home() / ".cache" / "digi2real"))
    return home / "bench.json"


def work_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the work per image (batch size and compile change the rate,
    not the work)."""
    return {
        "sampler": settings["sampler"],
        "steps": int(settings["steps"]),
        "guided": float(settings["guidance"]) > 1.0,
        "decoder": settings.get("decoder", "vae"),
        "dtype": settings["dtype"],
    }


def read_bench(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"bench result not found: {path} (run `digi2real bench`)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a digi2real bench result: {error}") from None
    if data.get("kind") != BENCH_KIND or data.get("format") != BENCH_FORMAT:
        raise ValueError(f"{path} is not a digi2real bench result (kind/format)")
    return data


@dataclass(frozen=True)
class Rate:
    """A measured images/s that applies to a run, and where it came from."""

    images_per_s: float
    source: str  # the file and the mode
    method: str  # end-to-end | composed
    notes: tuple[str, ...] = ()


def run_settings(config: Config, device: str) -> dict[str, Any]:
    gen = config.generation
    return {
        "sampler": gen.sampler,
        "steps": gen.steps,
        "guidance": gen.guidance,
        "decoder": gen.decoder,
        "dtype": resolve_dtype(gen.dtype, device),
        "batch_size": gen.batch_size,
        "compile": gen.compile,
    }


def find_rate(bench: dict[str, Any], path: Path, config: Config, device: str) -> Rate | None:
    """The bench mode that did this run's work per image on this kind of device; among
    several, end-to-end before composed, then the same batch size and compile flag."""
    wanted = run_settings(config, device)
    device_type = device.split(":")[0]
    if bench.get("device", {}).get("type") != device_type:
        return None
    candidates = [
        m
        for m in bench.get("modes", [])
        if m.get("images_per_s") and work_key(m["settings"]) == work_key(wanted)
    ]
    if not candidates:
        return None

    def preference(mode: dict[str, Any]) -> tuple[bool, bool, bool]:
        settings = mode["settings"]
        return (
            mode["method"] != "end-to-end",
            settings.get("batch_size") != wanted["batch_size"],
            bool(settings.get("compile")) != wanted["compile"],
        )

    best = min(candidates, key=preference)
    settings = best["settings"]
    notes = []
    if settings.get("batch_size") != wanted["batch_size"]:
        notes.append(
            f"measured at batch {settings.get('batch_size')}, this run uses {wanted['batch_size']}"
        )
    if bool(settings.get("compile")) != wanted["compile"]:
        notes.append(f"measured with compile={settings.get('compile')}")
    if best["method"] != "end-to-end":
        notes.append("composed from per-call timings: excludes post-processing")
    name = bench.get("device", {}).get("name", device_type)
    return Rate(
        float(best["images_per_s"]),
        f"{path} (mode {best['mode']}, {name})",
        best["method"],
        tuple(notes),
    )


def attempts_per_target(out: str | Path) -> tuple[float, str]:
    """Diffusion runs per planned target, from an OUT's committed shards (accepted images at
    their attempt, rejected targets after all theirs); else the assumption, said as one."""
    paths = OutLayout(out)
    runs = targets = 0
    if paths.state.is_dir():
        for shard in sorted(paths.committed()):  # one listing, on a disk or a store
            part = paths.shard(shard)
            accepted = read_table(part / layout.MANIFEST, columns=["attempt"])
            rejected = read_table(part / layout.REJECTED, columns=["attempts"])
            runs += sum(a + 1 for a in accepted.column("attempt").to_pylist())
            runs += sum(rejected.column("attempts").to_pylist())
            targets += accepted.num_rows + rejected.num_rows
    if targets:
        return runs / targets, f"measured on {targets} targets of {paths.root}"
    return ASSUMED_ATTEMPTS_PER_TARGET, "assumed (no committed shard to measure it from)"


def estimate(
    config: Config, out: str | Path, targets: int, device: str, bench_file: str | Path | None
) -> dict[str, Any]:
    """The dry run's cost lines: GPU-hours from a measured rate (or unknown, and how to
    measure it), and the attempts per target it assumes or measured."""
    attempts, attempts_source = attempts_per_target(out)
    lines: dict[str, Any] = {
        "attempts_per_target": attempts,
        "attempts_per_target_source": attempts_source,
    }
    path = Path(bench_file) if bench_file is not None else default_bench_file()
    rate = None
    if path.is_file():
        rate = find_rate(read_bench(path), path, config, device)
    elif bench_file is not None:
        raise FileNotFoundError(f"bench result not found: {path}")
    if rate is None:
        settings = run_settings(config, device)
        lines["estimated_gpu_hours"] = "unknown"
        lines["estimated_gpu_hours_source"] = (
            f"no bench result for sampler={settings['sampler']} steps={settings['steps']} "
            f"guidance={settings['guidance']} decoder={settings['decoder']} "
            f"dtype={settings['dtype']} on {device.split(':')[0]}"
            + (f" in {path}" if path.is_file() else "")
            + f"; measure it: `digi2real bench --modes {config.preset} --out {path}` on this "
            "machine (or pass --bench FILE)"
        )
        return lines
    seconds = targets * attempts / rate.images_per_s
    lines["estimated_gpu_hours"] = seconds / 3600
    lines["estimated_gpu_hours_source"] = (
        f"{rate.images_per_s:.3g} images/s {rate.method} from {rate.source}"
        + "".join(f"; {note}" for note in rate.notes)
    )
    return lines
