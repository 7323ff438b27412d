"""Peak memory of ``digi2real report OUT --gallery REAL --html`` on 1M synthetic outputs.

Builds a converted-dataset folder the way a conversion leaves it, without generating images:
``manifest.parquet`` (1M rows), ``.digi2real/{outputs,targets}.npy`` (1M x 512 float32, written
block by block), ``plan.parquet`` and the per-shard source-embedding caches (1M renders,
512-d, as the runner stores them), and a gallery ``.npy`` of real-face stand-ins with its rows
file. Then runs the report command in a child process (every figure: consistency, collisions,
near duplicates, leakage against the gallery, the domain gap with KID, the pictures and the
HTML) and reports the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``). Goal: < 4 GB.

    .venv/bin/python scripts/bench_report_memory.py [--rows 1000000 --identities 100000]

Images are not written: contact sheets show placeholders, as for a report whose images are
elsewhere; everything else reads what a real run would hold.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import _unit, write_arrays  # noqa: E402

from digi2real.config import Config, split_environment  # noqa: E402
from digi2real.data.embeddings import save_embeddings  # noqa: E402
from digi2real.data.layout import OutLayout  # noqa: E402
from digi2real.data.manifest import ERROR_SCHEMA, REJECTED_SCHEMA  # noqa: E402

GOAL_MB = 4096


def write_out(out: Path, rows: int, identities: int, dim: int, renders: int, seed: int) -> None:
    paths = OutLayout(out)
    paths.state.mkdir(parents=True)
    per_identity = rows // identities
    write_arrays(paths.state, rows, identities, dim, 65536, seed)
    names = [f"id_{n:06d}" for n in range(identities)]
    labels = np.arange(rows) // per_identity
    k = np.arange(rows) % per_identity
    identity_column = pa.array(np.asarray(names, dtype=object)[labels])
    image_paths = [f"images/{names[a]}/{b:04d}.jpg" for a, b in zip(labels, k, strict=True)]
    sources = pa.array([[f"{names[a]}/{b % renders}.png"] for a, b in zip(labels, k, strict=True)])
    manifest = pa.table(
        {
            "key": [f"{a:07d}_{b:04d}" for a, b in zip(labels, k, strict=True)],
            "identity": identity_column,
            "label": pa.array(labels, pa.int64()),
            "path": image_paths,
            "source_paths": sources,
        }
    )
    del image_paths, sources, identity_column
    # shards as the runner plans them, a cache per shard as it leaves them (list<double> rows)
    per_shard = 1000
    plan = {"shard": [], "identity": [], "files": []}
    rng = np.random.default_rng(seed + 1)
    rendered = _unit(rng.standard_normal((1, dim)))  # the renders' shared "look"
    (paths.state / "cache").mkdir()
    for shard, start in enumerate(range(0, identities, per_shard)):
        members = names[start : start + per_shard]
        files = [[f"{name}/{n}.png" for n in range(renders)] for name in members]
        plan["shard"] += [shard] * len(members)
        plan["identity"] += members
        plan["files"] += files
        centres = _unit(rng.standard_normal((len(members), dim)))
        noise = _unit(rng.standard_normal((len(members) * renders, dim))) * 0.8
        rows_f64 = _unit(np.repeat(centres, renders, 0) + noise + 0.7 * rendered).astype(np.float64)
        count = len(rows_f64)
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * dim)
        cache = pa.table(
            {
                "identity": np.repeat(np.asarray(members, dtype=object), renders),
                "path": [f for group in files for f in group],
                "stage": [""] * count,
                "reason": [""] * count,
                "embedding": pa.ListArray.from_arrays(offsets, pa.array(rows_f64.ravel())),
            }
        )
        pq.write_table(cache, paths.cache(shard))
    pq.write_table(pa.table(plan), paths.plan)
    portable, moved = split_environment(Config().to_dict())
    record = {
        "config": portable,
        "weights": {"profile": "real", "digest": "0" * 64, "files": []},
        "shift": None,
        "environment": moved,
    }
    paths.config.write_text(yaml.safe_dump(record, sort_keys=True))
    pq.write_table(REJECTED_SCHEMA.empty_table(), paths.rejected)
    pq.write_table(ERROR_SCHEMA.empty_table(), paths.errors)
    pq.write_table(manifest, paths.manifest)


def write_gallery(path: Path, people: int, per_person: int, dim: int, seed: int) -> Path:
    rng = np.random.default_rng(seed + 2)
    centres = _unit(rng.standard_normal((people, dim)))
    rows = _unit(
        np.repeat(centres, per_person, 0)
        + _unit(rng.standard_normal((people * per_person, dim))) * 0.8
    )
    names = [f"real_{n:05d}" for n in range(people) for _ in range(per_person)]
    return save_embeddings(path, rows, identities=names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="outputs")
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--renders", type=int, default=10, help="source renders per identity")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--gallery-people", type=int, default=2000)
    parser.add_argument("--gallery-per-person", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    if args.rows % args.identities:
        parser.error("--rows must be a multiple of --identities")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "OUT"
        start = time.perf_counter()
        write_out(out, args.rows, args.identities, args.dim, args.renders, args.seed)
        gallery = write_gallery(
            Path(tmp) / "real.npy",
            args.gallery_people,
            args.gallery_per_person,
            args.dim,
            args.seed,
        )
        print(f"wrote the dataset and gallery in {time.perf_counter() - start:.0f} s", flush=True)
        command = [
            sys.executable,
            "-m",
            "digi2real",
            "report",
            str(out),
            "--gallery",
            str(gallery),
            "--html",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            print(done.stdout, done.stderr, sep="\n")
            return done.returncode
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads(OutLayout(out).report_json.read_text())
    gap = report["domain_gap"]["recognizer"]
    print(done.stdout.strip())
    print(
        f"report of {args.rows} outputs x {args.dim} (+ {gap['sources']['count']} cached renders, "
        f"{gap['gallery']['count']} gallery faces) in {seconds:.0f} s; peak RSS of the report "
        f"process {peak:.0f} MiB (goal < {GOAL_MB}: {'pass' if peak < GOAL_MB else 'FAIL'})"
    )
    return 0 if peak < GOAL_MB else 1


if __name__ == "__main__":
    sys.exit(main())
