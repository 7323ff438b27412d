"""The text ``digi2real report`` prints: a few lines over a report's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from digi2real.data.layout import OutLayout


def format_source(result: dict[str, Any], threshold: float) -> str:
    lines = [
        f"source identities: {result['identities']}, images: {result['images']}",
        f"near-duplicate identity pairs (centroid cosine >= {threshold}): {result['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in result["collisions"][:20]]
    if result["num_collisions"]:
        lines.append("these would be label noise after conversion: drop or merge them first")
    return "\n".join(lines)


def format_report(result: dict[str, Any], out: Path) -> str:
    counts = result["counts"]
    consistency = result["consistency"]["image_to_target"]
    separation = result["separation"]
    leakage = result.get("leakage")
    lines = [
        f"images: {counts['images']} in {counts['identities']} identities",
        f"image-to-target cosine: mean {consistency.get('mean')}, min {consistency.get('min')}",
        f"identity collisions: {separation['num_collisions']}",
    ]
    lines += [f"  {c['a']} ~ {c['b']}: {c['score']}" for c in separation["collisions"][:10]]
    if leakage is not None:
        lines.append(f"leaks against the gallery: {len(leakage['leaks'])}")
    lines.append(f"report: {OutLayout(out).report}")
    return "\n".join(lines)
