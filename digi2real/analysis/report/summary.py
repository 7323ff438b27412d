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
    for space, figures in (result.get("domain_gap") or {}).items():
        if figures:
            lines.append(_gap_line(space, figures))
    if result.get("attributes"):
        lines += _attribute_lines(result["attributes"])
    if result.get("notice"):
        lines.append(f"NOTE: {result['notice']}")
    lines.append(f"report: {OutLayout(out).report}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _gap_line(space: str, figures: dict[str, Any]) -> str:
    """One line per space: FD and KID of the sources and the outputs, the share closed."""
    if figures.get("skipped"):
        return f"domain gap ({space}): skipped: {figures['skipped']}"
    sources, outputs = figures.get("sources") or {}, figures["outputs"]
    closed = (figures.get("gap_closed") or {}).get("fd")
    return (
        f"domain gap ({space}, vs {figures['gallery']['count']} real faces): "
        f"FD sources {_number(sources.get('fd'))} -> outputs {_number(outputs['fd'])}"
        f" (closed {_number(closed)}), KID sources {_number(sources.get('kid'))} -> "
        f"outputs {_number(outputs['kid'])} ± {_number(outputs['kid_std'])}"
    )


def _attribute_lines(section: dict[str, Any]) -> list[str]:
    """What a run carrying attributes made of them: what is carried, label fidelity, balance."""
    names = section.get("columns") or []
    shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    lines = [f"attributes carried ({section.get('origin')}): {shown or 'none'}"]
    fidelity = section.get("label_fidelity") or {}
    parts = []
    nme = fidelity.get("nme") or {}
    if nme.get("count"):
        parts.append(
            f"NME median {_number(nme['median'])}% of inter-pupil distance, "
            f"{_number(100 * nme['share_below_5'])}% of outputs under 5%"
        )
    yaw = (fidelity.get("pose") or {}).get("yaw")
    if yaw and yaw.get("mae") is not None:
        parts.append(f"yaw MAE {_number(yaw['mae'])} deg vs {yaw['reference']}")
    if parts:
        lines.append("label fidelity: " + "; ".join(parts))
    balance = section.get("balance")
    if balance and not balance.get("skipped"):
        per_bin = " / ".join(str(b["outputs"]) for b in balance["bins"])
        lines.append(
            f"balance {balance['spec']}: outputs per bin {per_bin} (requested even); "
            f"{balance['uneven_identities']} of {balance['identities']} identities uneven"
        )
    return lines
