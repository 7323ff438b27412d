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


def _head(title: str) -> list[str]:
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html_lib.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}",
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}",
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}",
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd}",
        ".notice{background:#fff3cd;border:1px solid #e0b000;padding:0.6em 1em}",
        f"</style></head><body><h1>{html_lib.escape(title)}</h1>",
    ]


def _notice(report: dict[str, Any]) -> list[str]:
    if not report.get("notice"):
        return []
    return [f"<p class='notice'><b>Note.</b> {html_lib.escape(report['notice'])}</p>"]


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
        *_head("digi2real dataset report"),
        *_notice(report),
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
        f"<h2>Collisions (centroid cosine &ge; {_text(report['thresholds']['collision'])})</h2>",
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
            f"(cosine &ge; {_text(leakage['threshold'])})</h2>",
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
        f"<h2>Near duplicates (cosine &ge; {_text(report['thresholds']['near_duplicate'])})</h2>",
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
    parts += _gap_section(report, report_dir, embed_images)
    parts += _pose_section(report, report_dir, embed_images)
    parts += _attributes_section(report, report_dir, embed_images)
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


def _text(value: Any) -> str:
    """A user-given value (an attribute name, a --where or --balance string), escaped."""
    return html_lib.escape("-" if value is None else str(value))


def _attributes_section(report: dict[str, Any], report_dir: Path, embed_images: bool) -> list[str]:
    section = report.get("attributes")
    if not section:
        return []
    parts = [
        "<h2>Attributes</h2>",
        f"<p>origin {_text(section.get('origin'))}; carried: "
        f"{_text(', '.join(section.get('columns') or []) or 'none')}; geometry "
        f"{_text(section.get('geometry'))}; where <code>{_text(section.get('where'))}</code>; "
        f"balance <code>{_text(section.get('balance_spec'))}</code></p>",
        f"<p>{_text(section.get('note'))}</p>",
    ]
    stats = ("count", "mean", "std", "min", "max")
    rows = []
    for name, figures in section.get("numeric", {}).items():
        for side in ("sources", "outputs"):
            summary = figures.get(side) or {}
            rows.append((name, figures["kind"], side, *(summary.get(k, "") for k in stats)))
    if rows:
        parts.append(_table(("attribute", "kind", "population", *stats), rows))
    if section.get("png"):
        src = _image_src(report_dir / section["png"], embed_images)
        parts.append(f"<p><img src='{src}' alt='attributes'></p>")
    parts += _balance_part(section.get("balance"))
    parts += _fidelity_part(section.get("label_fidelity"))
    for name in section.get("landmark_sheets", []):
        src = _image_src(report_dir / name, embed_images)
        parts.append(f"<p><img src='{src}' alt='{html_lib.escape(name)}'></p>")
    return parts


def _balance_part(balance: dict[str, Any] | None) -> list[str]:
    if not balance:
        return []
    parts = [f"<h3>Balance <code>{_text(balance['spec'])}</code></h3>"]
    if balance.get("skipped"):
        return [*parts, f"<p>{_text(balance['skipped'])}</p>"]
    parts.append(
        _table(
            ("bin", "requested share", "outputs", "achieved share"),
            [(b["bin"], b["requested_share"], b["outputs"], b["share"]) for b in balance["bins"]],
        )
    )
    reasons = balance["uneven_reasons"]
    why = (
        f"no render in a bin: {reasons['no_render_in_a_bin']}, with rejected targets: "
        f"{reasons['rejected_targets']}, unexplained: {reasons['unexplained']}"
        if reasons
        else "why is unknown: the rejected targets' renders are not recorded"
    )
    parts.append(
        f"<p>{balance['outside_bins']} output(s) in no bin. {balance['uneven_identities']} of "
        f"{balance['identities']} identities have per-bin counts differing by more than 1 "
        f"({why}). {_text(balance['note'])}</p>"
    )
    if balance["uneven_examples"]:
        parts.append(
            _table(
                ("identity", "label", "outputs per bin", "planned per bin", "rejected"),
                [
                    (
                        e["identity"],
                        e["label"],
                        " / ".join(map(str, e["outputs"])),
                        " / ".join(map(str, e["planned"])),
                        e["rejected"],
                    )
                    for e in balance["uneven_examples"]
                ],
            )
        )
    return parts


def _fidelity_part(fidelity: dict[str, Any] | None) -> list[str]:
    if not fidelity:
        return []
    parts = ["<h3>Label fidelity</h3>"]
    nme = fidelity.get("nme")
    if nme:
        columns = ("count", "missing", "mean", "median", "p90", "max")
        shares = [k for k in nme if k.startswith("share_below_")]
        parts.append(
            _table(
                ("NME, % inter-pupil", *columns, *(k.replace("_", " ") + "%" for k in shares)),
                [("outputs", *(nme.get(k, "") for k in (*columns, *shares)))],
            )
        )
    pose = fidelity.get("pose") or {}
    if pose:
        parts.append(
            _table(
                ("axis", "measured", "against", "reference", "pairs", "MAE", "mean diff", "r"),
                [
                    (
                        axis,
                        f["measured"],
                        f["column"],
                        f["reference"],
                        f["count"],
                        f["mae"],
                        f["mean_difference"],
                        f["correlation"],
                    )
                    for axis, f in pose.items()
                ],
            )
        )
        parts.append(f"<p>{_text(fidelity.get('pose_note'))}</p>")
    parts.append(f"<p class='notice'>{_text(fidelity['cannot_tell'])}</p>")
    return parts


def _gap_rows(space: str, figures: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = [
        (space, "real gallery", figures["gallery"]["count"], 0, 0, "", "")
    ]
    closed = figures.get("gap_closed") or {}
    for role, name in (("sources", "source renders"), ("outputs", "outputs")):
        row = figures.get(role)
        if not row:
            continue
        kid = "" if row["kid"] is None else f"{row['kid']:.4g} ± {row['kid_std']:.2g}"
        gap = ("", "") if role == "sources" else (closed.get("fd"), closed.get("kid"))
        fd = "" if row["fd"] is None else f"{row['fd']:.4g}"
        rows.append((space, name, row["count"], fd, kid, *gap))
    return rows


def _gap_section(report: dict[str, Any], report_dir: Path, embed_images: bool) -> list[str]:
    gap = report.get("domain_gap")
    if not gap:
        return []
    parts = ["<h2>Domain gap against real faces</h2>"]
    rows, pictures, notes = [], [], []
    for space, figures in (
        ("recognizer", gap.get("recognizer")),
        ("features", gap.get("features")),
    ):
        if not figures:
            continue
        label = space if space == "recognizer" else f"{figures['model']} features"
        if figures.get("skipped"):
            notes.append(f"{label}: {figures['skipped']}")
            continue
        rows += _gap_rows(label, figures)
        pictures.append(_image_src(report_dir / figures["png"], embed_images))
        if figures.get("missing_shards"):
            notes.append(
                f"{label}: {figures['missing_shards']} shard(s) of source renders had no cached "
                "embeddings and were left out (pass --weights to embed them again)"
            )
    parts.append(
        "<p>Fréchet distance (FD, Heusel et al. 2017) and KID (Bińkowski et al. 2018, mean ± "
        "std over subsets) of each population against the gallery; lower is closer. Gap "
        "closed = 1 - d(outputs) / d(sources). See docs/report.md for what these cannot tell."
        "</p>"
    )
    parts.append(
        _table(
            ("space", "population", "images", "FD", "KID", "FD gap closed", "KID gap closed"), rows
        )
    )
    parts += [f"<p>{html_lib.escape(note)}</p>" for note in notes]
    parts += [f"<p><img src='{src}' alt='domain gap'></p>" for src in pictures]
    return parts


def write_compare_html(
    result: dict[str, Any],
    path: Path,
    pictures: dict[str, list[Path]],
    *,
    embed_images: bool = False,
) -> Path:
    """``compare.html``: the runs' settings that differ, their figures, their gap pictures."""
    names = [run["name"] for run in result["runs"]]

    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else value

    parts = [*_head("digi2real: runs compared")]
    for run in result["runs"]:
        if run["notice"]:
            parts.append(
                f"<p class='notice'><b>{html_lib.escape(run['name'])}.</b> "
                f"{html_lib.escape(run['notice'])}</p>"
            )
    parts += [
        "<h2>Settings that differ</h2>",
        _table(
            ("field", *names),
            [(d["field"], *(cell(v) for v in d["values"])) for d in result["differences"]],
        ),
        "<h2>Figures</h2>",
        _table(
            ("figure", *names),
            [(f["figure"], *(cell(v) for v in f["values"])) for f in result["figures"]],
        ),
    ]
    if any(pictures.values()):
        parts.append("<h2>Domain gap</h2><table><tr>")
        for name in names:
            images = "".join(
                f"<img src='{_image_src(p, True) if embed_images else html_lib.escape(p.as_posix())}'"
                " alt='domain gap'>"
                for p in pictures.get(name, [])
            )
            parts.append(f"<td><b>{html_lib.escape(name)}</b><br>{images}</td>")
        parts.append("</tr></table>")
    parts.append("</body></html>\n")
    fsio.atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
