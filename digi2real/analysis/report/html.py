"""``OUT/report/index.html``: one page over the report's figures and pictures that opens
from the folder (pictures linked by name, or embedded as data URIs)."""

from __future__ import annotations

import base64
import html as html_lib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digi2real.data import fsio, layout


def _image_src(path: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html_lib.escape(path.name)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html_lib.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _distribution_table(named: dict[str, dict[str, Any]]) -> str:
    columns = ("count", "mean", "min", "p05", "median", "p95", "max")
    return _table(
        ("figure", *columns),
        [
            (name, *(dist.get(c, "") for c in columns))
            for name, dist in named.items()
            if isinstance(dist, dict)  # skips figures a judge makes meaningless, and notes
        ],
    )


def write_html(report: dict[str, Any], report_dir: Path, *, embed_images: bool = False) -> Path:
    limit = 200
    counts = report["counts"]
    separation = report["separation"]
    diversity = report["diversity"]
    leakage = report.get("leakage")
    worst = sorted(
        report["identities"], key=lambda row: (row["mean_to_target"] or 0.0, row["label"])
    )[:20]
    histogram = _image_src(report_dir / layout.REPORT_HISTOGRAM, embed_images)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>digi2real dataset report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}",
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}",
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}",
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd}",
        "</style></head><body><h1>digi2real dataset report</h1>",
        _table(
            ("images", "identities", "rejected", "errors", "collisions", "leaks", "near dups"),
            [
                (
                    counts["images"],
                    counts["identities"],
                    counts.get("rejected", "n/a"),
                    counts.get("errors", "n/a"),
                    separation["num_collisions"],
                    leakage["num_leaks"] if leakage else "no gallery",
                    diversity["num_near_duplicates"],
                )
            ],
        ),
        "<h2>Consistency and separation</h2>",
        f"<img src='{histogram}' alt='similarity histogram'>",
        _distribution_table(
            {
                **report["consistency"],
                "nearest other identity": separation["nearest_other"],
                "mean pairwise distance": diversity["mean_pairwise_distance"],
                "images per identity": counts["images_per_identity"],
            }
        ),
        f"<h2>Collisions (centroid cosine &ge; {report['thresholds']['collision']})</h2>",
        _table(
            ("a", "label a", "b", "label b", "score"),
            [
                (p["a"], p["label_a"], p["b"], p["label_b"], p["score"])
                for p in separation["collisions"][:limit]
            ],
        ),
    ]
    if leakage:
        parts += [
            f"<h2>Leakage against {html_lib.escape(str(leakage['gallery']))} "
            f"(cosine &ge; {leakage['threshold']})</h2>",
            _table(
                ("identity", "label", "gallery identity", "score", "matched by", "image"),
                [
                    (
                        leak["identity"],
                        leak["label"],
                        leak["gallery_identity"],
                        leak["score"],
                        "+".join(leak["matched"]),
                        leak["image"],
                    )
                    for leak in leakage["leaks"][:limit]
                ],
            ),
        ]
    parts += [
        f"<h2>Near duplicates (cosine &ge; {report['thresholds']['near_duplicate']})</h2>",
        _table(
            ("identity", "a", "b", "score"),
            [
                (d["identity"], d["a"], d["b"], d["score"])
                for d in diversity["near_duplicates"][:limit]
            ],
        ),
        "<h2>Least consistent identities</h2>",
        _table(
            (
                "identity",
                "label",
                "images",
                "mean to target",
                "mean to centroid",
                "nearest",
                "score",
            ),
            [
                (
                    row["identity"],
                    row["label"],
                    row["images"],
                    row["mean_to_target"],
                    row["mean_to_centroid"],
                    row["nearest"],
                    row["nearest_score"],
                )
                for row in worst
            ],
        ),
    ]
    parts += _pose_section(report, report_dir, embed_images)
    parts.append("<h2>Contact sheets</h2>")
    for name in report.get("contact_sheets", []):
        src = _image_src(report_dir / name, embed_images)
        parts.append(f"<p><img src='{src}' alt='{html_lib.escape(name)}'></p>")
    parts.append("</body></html>\n")
    path = report_dir / layout.REPORT_HTML
    fsio.atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path


def _pose_section(report: dict[str, Any], report_dir: Path, embed_images: bool) -> list[str]:
    pose = report.get("pose")
    if not pose:
        return []

    def row(side: str) -> tuple[Any, ...]:
        figures = pose[side]
        return (
            side,
            f"{figures['with_landmarks']} / {figures['images']}",
            figures["yaw"].get("min"),
            figures["yaw"].get("median"),
            figures["yaw"].get("max"),
            figures["identity_yaw_range"].get("median"),
            figures["pitch"].get("min"),
            figures["pitch"].get("max"),
        )

    src = _image_src(report_dir / layout.REPORT_POSE, embed_images)
    return [
        "<h2>Pose (degrees, from five landmarks)</h2>",
        _table(
            (
                "",
                "landmarks found",
                "yaw min",
                "yaw median",
                "yaw max",
                "median identity yaw range",
                "pitch min",
                "pitch max",
            ),
            [row("sources"), row("outputs")],
        ),
        f"<p><img src='{src}' alt='pose'></p>",
    ]
