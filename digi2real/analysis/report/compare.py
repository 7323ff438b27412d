"""``digi2real report --compare OUT_A OUT_B ...``: several conversions side by side.

Each run's figures come from its ``report.json`` (consistency, separation, diversity, domain
gap, acceptance rate, pose spread where it was computed, label fidelity where the run carries
landmarks or pose); its config from its ``config.yaml``, flattened, without the fields that
say where and how a run executed rather than what it made
(:data:`digi2real.config.PLACEMENT_FIELDS`, :data:`digi2real.config.HOST_PATH_FIELDS`). The
comparison names the fields in which the runs differ, so a user reads which setting
(``shift.alpha``, ``generation.init_strength``, steps, a fast preset) moved which figure. It is
printed as a text table and written as ``compare.json`` and ``compare.html``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from digi2real.analysis.report.dataset import read_run_config
from digi2real.config import HOST_PATH_FIELDS, PLACEMENT_FIELDS, flatten
from digi2real.data import fsio, layout

Getter = Callable[[dict[str, Any]], Any]


def _at(*keys: str) -> Getter:
    def get(report: dict[str, Any]) -> Any:
        node: Any = report
        for key in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    return get


def _acceptance(report: dict[str, Any]) -> float | None:
    counts = report.get("counts") or {}
    images, rejected = counts.get("images"), counts.get("rejected")
    if images is None or rejected is None or images + rejected == 0:
        return None
    return round(images / (images + rejected), 6)


# (name, what it reads): the figures a run is judged by, in the order they are shown
FIGURES: tuple[tuple[str, Getter], ...] = (
    ("images", _at("counts", "images")),
    ("identities", _at("counts", "identities")),
    ("acceptance rate", _acceptance),
    ("image to target, median cosine", _at("consistency", "image_to_target", "median")),
    ("image to centroid, median cosine", _at("consistency", "image_to_centroid", "median")),
    ("nearest other identity, median", _at("separation", "nearest_other", "median")),
    ("identity collisions", _at("separation", "num_collisions")),
    ("diversity, median pairwise distance", _at("diversity", "mean_pairwise_distance", "median")),
    ("near duplicates", _at("diversity", "num_near_duplicates")),
    ("leaks against the gallery", _at("leakage", "num_leaks")),
    ("FD sources -> gallery", _at("domain_gap", "recognizer", "sources", "fd")),
    ("FD outputs -> gallery", _at("domain_gap", "recognizer", "outputs", "fd")),
    ("FD gap closed", _at("domain_gap", "recognizer", "gap_closed", "fd")),
    ("KID sources -> gallery", _at("domain_gap", "recognizer", "sources", "kid")),
    ("KID outputs -> gallery", _at("domain_gap", "recognizer", "outputs", "kid")),
    ("KID outputs std", _at("domain_gap", "recognizer", "outputs", "kid_std")),
    ("features: FD outputs -> gallery", _at("domain_gap", "features", "outputs", "fd")),
    ("features: FD gap closed", _at("domain_gap", "features", "gap_closed", "fd")),
    ("features: KID outputs -> gallery", _at("domain_gap", "features", "outputs", "kid")),
    (
        "pose: median identity yaw range (outputs)",
        _at("pose", "outputs", "identity_yaw_range", "median"),
    ),
    # geometry kept (a run carrying landmarks): beside the domain gap (realism) above, what
    # e.g. several --init-strength values trade
    (
        "label fidelity: median NME (% inter-pupil)",
        _at("attributes", "label_fidelity", "nme", "median"),
    ),
    (
        "label fidelity: yaw MAE (degrees)",
        _at("attributes", "label_fidelity", "pose", "yaw", "mae"),
    ),
)

_IGNORED = frozenset(PLACEMENT_FIELDS) | frozenset(HOST_PATH_FIELDS)


def run_settings(out: Path) -> dict[str, Any]:
    """A run's flattened config without placement and host paths, plus what its files were
    made with (the weights' digest, the domain-shift statistics)."""
    config, record = read_run_config(out)
    settings = {k: v for k, v in flatten(config).items() if k not in _IGNORED}
    settings["weights.digest"] = (record.get("weights") or {}).get("digest")
    for key, value in flatten(record.get("shift") or {}, "shift_stats.").items():
        settings[key] = value
    return settings


def _names(outs: Sequence[Path]) -> list[str]:
    names = [Path(out).name or str(out) for out in outs]
    if len(set(names)) == len(names):
        return names
    return [str(out) for out in outs]


def compare_runs(outs: Sequence[Path], reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of each run and the settings in which they differ (JSON-able)."""
    if len(outs) < 2 or len(outs) != len(reports):
        raise ValueError(f"--compare needs at least two runs with reports, got {len(outs)}")
    settings = [run_settings(Path(out)) for out in outs]
    fields = sorted(set().union(*settings))
    differences = [
        {"field": name, "values": [s.get(name) for s in settings]}
        for name in fields
        if any(s.get(name) != settings[0].get(name) for s in settings[1:])
    ]
    figures = [
        {"figure": name, "values": [get(report) for report in reports]}
        for name, get in FIGURES
        if any(get(report) is not None for report in reports)
    ]
    return {
        "runs": [
            {"name": name, "out": str(out), "notice": report.get("notice")}
            for name, out, report in zip(_names(outs), outs, reports, strict=True)
        ],
        "differences": differences,
        "figures": figures,
        "pictures": [
            {"name": name, "files": _pictures(Path(out), report)}
            for name, out, report in zip(_names(outs), outs, reports, strict=True)
        ],
    }


def _pictures(out: Path, report: dict[str, Any]) -> list[str]:
    """A run's domain-gap pictures (recognizer space, then the encoder's)."""
    gap = report.get("domain_gap") or {}
    files = []
    for space in ("recognizer", "features"):
        picture = (gap.get(space) or {}).get("png")
        if picture:
            files.append(str(out / layout.REPORT / picture))
    return files


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)) for row in rows]
    return [line, rule, *body]


def format_compare(result: dict[str, Any], written: Sequence[Path] = ()) -> str:
    names = [run["name"] for run in result["runs"]]
    lines = ["settings that differ:"]
    if result["differences"]:
        rows = [[d["field"], *(_cell(v) for v in d["values"])] for d in result["differences"]]
        lines += _text_table(["field", *names], rows)
    else:
        lines.append("  none (same config, weights and statistics)")
    lines += ["", "figures:"]
    rows = [[f["figure"], *(_cell(v) for v in f["values"])] for f in result["figures"]]
    lines += _text_table(["figure", *names], rows)
    for run in result["runs"]:
        if run["notice"]:
            lines.append(f"{run['name']}: {run['notice']}")
    lines += [f"written: {path}" for path in written]
    return "\n".join(lines)


def write_compare(result: dict[str, Any], dest: Path, *, embed_images: bool = False) -> list[Path]:
    """``compare.json`` and ``compare.html`` in ``dest`` (pictures linked relative to it)."""
    from digi2real.analysis.report.html import write_compare_html

    dest = fsio.make_dirs(dest)
    json_path = dest / layout.REPORT_COMPARE_JSON
    text = json.dumps(result, indent=1, sort_keys=True, allow_nan=False) + "\n"
    fsio.atomic_write_bytes(json_path, text.encode("utf-8"))
    pictures = {
        entry["name"]: [
            Path(path) if embed_images else Path(os.path.relpath(path, dest))
            for path in entry["files"]
        ]
        for entry in result["pictures"]
    }
    html_path = write_compare_html(
        result, dest / layout.REPORT_COMPARE_HTML, pictures, embed_images=embed_images
    )
    return [json_path, html_path]
