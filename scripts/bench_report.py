"""Benchmark the report's figures at scale: 1M unit 512-d embeddings in 100K identities.

Writes row-aligned outputs/targets ``.npy`` files block by block (never the whole array in
memory), memory-maps them as the report does, runs ``digi2real.analysis.report.compute_figures``
(centroids, consistency, nearest other identity, collisions, near duplicates, diversity,
histograms) and serialises the figures as report.json would be. Prints stage wall times
and peak RSS (``resource.getrusage``). Target: 2 cores, peak RSS under 4 GB.

    .venv/bin/python scripts/bench_report.py [--rows 1000000 --identities 100000 --dim 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from digi2real.analysis.report import compute_figures

PLANTED_EVERY = 10_000  # every this many identities, one is a copy of its predecessor


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_arrays(folder: Path, rows: int, identities: int, dim: int, block: int, seed: int):
    """outputs.npy / targets.npy around per-identity centres; labels are row // per_identity."""
    per_identity = rows // identities
    # Smaller blocks than the report's: generation temporaries must not set the peak.
    block = max(per_identity, min(block, 16_384))
    block -= block % per_identity  # a block holds whole identities, so centres stay local
    labels = np.arange(rows, dtype=np.int64) // per_identity
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    paths = folder / "outputs.npy", folder / "targets.npy"
    handles = [path.open("wb") for path in paths]
    pairs = 0
    try:
        for handle in handles:
            np.lib.format.write_array_header_1_0(handle, header)
        for number, start in enumerate(range(0, rows, block)):
            rng = np.random.default_rng([seed, number])
            block_labels = labels[start : start + block]
            first = int(block_labels[0])
            centres = rng.standard_normal((int(block_labels[-1]) - first + 1, dim), np.float32)
            planted = np.flatnonzero((np.arange(first, first + len(centres)) % PLANTED_EVERY) == 1)
            planted = planted[planted > 0]  # its predecessor must be in this block
            centres[planted] = centres[planted - 1]
            pairs += len(planted)
            centres = _unit(centres)
            # Noise norm 0.8: image-to-centre cosine ~0.78, like decent ArcFace consistency.
            noise = _unit(rng.standard_normal((len(block_labels), dim), np.float32)) * 0.8
            outputs = _unit(centres[block_labels - first] + noise)
            targets = _unit(outputs + _unit(rng.standard_normal(outputs.shape, np.float32)) * 0.5)
            handles[0].write(outputs.tobytes())
            handles[1].write(targets.tobytes())
    finally:
        for handle in handles:
            handle.close()
    return paths, labels, pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    if args.rows % args.identities:
        parser.error("--rows must be a multiple of --identities")
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)9.0f ms %(name)s: %(message)s"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        (outputs_path, targets_path), labels, planted = write_arrays(
            folder, args.rows, args.identities, args.dim, args.block, args.seed
        )
        made = time.perf_counter() - start
        print(
            f"wrote 2 x {args.rows} x {args.dim} float32 in {made:.1f} s, peak RSS "
            f"{peak_rss_mb():.0f} MB"
        )

        start = time.perf_counter()
        outputs = np.load(outputs_path, mmap_mode="r")
        targets = np.load(targets_path, mmap_mode="r")
        names = [f"identity_{n:06d}" for n in range(args.identities)]
        keys = [
            f"{label:07d}_{n % (args.rows // args.identities):04d}"
            for n, label in enumerate(labels.tolist())
        ]
        figures = compute_figures(
            outputs, targets, labels, names, keys=keys, block=args.block
        ).figures
        computed = time.perf_counter() - start
        text = json.dumps(figures, indent=1, sort_keys=True, allow_nan=False)
        total = time.perf_counter() - start

    separation = figures["separation"]
    print(
        f"figures in {computed:.1f} s, + report.json ({len(text) / 1e6:.1f} MB) "
        f"{total - computed:.1f} s"
    )
    print(
        f"collisions found {separation['num_collisions']} (planted {planted}); "
        f"near duplicates {figures['diversity']['num_near_duplicates']}"
    )
    print(
        f"median image-to-centroid {figures['consistency']['image_to_centroid']['median']}, "
        f"median nearest other {separation['nearest_other']['median']}"
    )
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
