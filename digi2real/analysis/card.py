"""``OUT/DATASET_CARD.md``: what was generated, from what, under which licences.

The licence chain comes from the weights manifest (every file with its licence, URL and a
``commercial`` flag) plus the source dataset's licence. When any link forbids commercial
use the card says so in its first lines, because that restriction travels with the data.
The content is deterministic: no timestamps, no absolute paths of the machine that wrote it.

Every string that is not the card's own (licence texts and URLs, config values, names of
files, a gallery, a LoRA) is escaped: as Markdown text by ``_cell`` (one line, no table
``|``, no HTML, no link, no code span), as a code span by ``_code``; the effective config is
fenced by more backticks than it holds, and the Hub card's metadata is written by a YAML
dumper. Ordinary text (one line, single spaces, none of ``| < > & [ ] \\ ` ``) is written as it is.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from digi2real import markdown
from digi2real.config import dump_yaml, merge_environment, read_yaml
from digi2real.data import fsio, layout
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import parquet_rows, read_table
from digi2real.data.store import is_url, location

logger = logging.getLogger(__name__)

DIGIFACE_LICENSE = "DigiFace-1M Research Use of Data Agreement (non-commercial research use only)"
DIGIFACE_URL = "https://github.com/microsoft/DigiFace1M/blob/main/LICENSE"
# Words that mark a licence text as non-commercial when no explicit flag is given.
_NON_COMMERCIAL = re.compile(
    r"non[- ]?commercial|research[- ](use|only|purposes)|\bNC\b|-NC-|\bNC-", re.IGNORECASE
)
# Config keys whose values hold paths of the writing machine or its environment.
_HOST_KEYS = {"environment"}


def is_non_commercial(license_text: str | None, commercial: bool | None = None) -> bool:
    """An explicit ``commercial`` flag wins; otherwise read the licence text."""
    if commercial is not None:
        return not commercial
    return bool(license_text) and bool(_NON_COMMERCIAL.search(license_text or ""))


def looks_like_digiface(config: dict[str, Any]) -> bool:
    source = config.get("source") or {}
    hints = [str(source.get(key, "")) for key in ("root", "name", "format", "kind", "reader")]
    return any(re.search(r"digi[-_ ]?face", hint, re.IGNORECASE) for hint in hints)


def source_license_entry(config: dict[str, Any], source_license: str | None) -> dict[str, Any]:
    """The source dataset's link in the chain: as given, DigiFace-1M's by default, or unknown."""
    source = config.get("source") or {}
    source_license = source_license or source.get("license")
    if source_license:
        return {
            "license": source_license,
            "license_url": source.get("license_url"),
            "non_commercial": is_non_commercial(source_license),
            "known": True,
        }
    if looks_like_digiface(config):
        return {
            "license": DIGIFACE_LICENSE,
            "license_url": DIGIFACE_URL,
            "non_commercial": True,
            "known": True,
        }
    return {"license": None, "license_url": None, "non_commercial": False, "known": False}


def _license_rows(weights_manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (component, licence, URL, commercial) with the files it covers."""
    grouped: dict[tuple[Any, ...], list[str]] = {}
    for entry in weights_manifest.get("files", []):
        key = (
            entry.get("component") or "other",
            entry.get("license") or "unknown",
            entry.get("license_url") or "",
            is_non_commercial(entry.get("license"), entry.get("commercial")),
        )
        grouped.setdefault(key, []).append(str(entry.get("path", "?")))
    return [
        {
            "component": component,
            "license": license_text,
            "license_url": url,
            "non_commercial": non_commercial,
            "files": sorted(files),
        }
        for (component, license_text, url, non_commercial), files in sorted(grouped.items())
    ]


def _portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The effective config without host-dependent parts (environment, absolute paths)."""

    def strip(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: strip(v, str(k)) for k, v in value.items() if k not in _HOST_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str) and key in {"root", "dir", "path"}:
            if is_url(value):  # a store's URL names a bucket: a host detail too
                return location(value).name
            if Path(value).is_absolute():
                return Path(value).name
        return value

    return strip(config)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict) and "median" in value:
        # A report distribution: the median and range read better than the whole summary.
        return (
            f"median {_fmt(value['median'])} (min {_fmt(value['min'])}, max {_fmt(value['max'])})"
        )
    return str(value)


def _generation(config: dict[str, Any], lora: dict[str, Any] | None) -> list[str]:
    """How the images were sampled: what sets their cost and their look."""
    gen = config.get("generation") or {}
    lora_text = (
        f"{markdown.code(lora['name'], table=True)} (sha256 {markdown.text(lora['sha256'][:16])}..., scale "
        f"{lora['scale']:g}), fused"
        if lora
        else "none"
    )
    return [
        "## Generation",
        "",
        "| setting | value |",
        "|---|---|",
        f"| sampler | {markdown.text(gen.get('sampler', 'n/a'))}, {markdown.text(gen.get('steps', 'n/a'))} "
        f"steps, guidance {markdown.text(gen.get('guidance', 'n/a'))} |",
        f"| LoRA | {lora_text} |",
        f"| decoder | {markdown.text(gen.get('decoder', 'vae'))} |",
        "",
    ]


def _headline(report: dict[str, Any]) -> list[str]:
    consistency = report.get("consistency", {})
    separation = report.get("separation", {})
    diversity = report.get("diversity", {})
    leakage = report.get("leakage")
    thresholds = report.get("thresholds", {})
    lines = [
        "| figure | value |",
        "|---|---|",
        "| median cosine, image to its target | "
        f"{_fmt(consistency.get('image_to_target', {}).get('median'))} |",
        "| median cosine, image to its identity centroid | "
        f"{_fmt(consistency.get('image_to_centroid', {}).get('median'))} |",
        "| median cosine, identity to nearest other identity | "
        f"{_fmt(separation.get('nearest_other', {}).get('median'))} |",
        f"| identity collisions (centroid cosine >= {_fmt(thresholds.get('collision'))}) | "
        f"{_fmt(separation.get('num_collisions'))} |",
        "| median mean pairwise distance within an identity | "
        f"{_fmt(diversity.get('mean_pairwise_distance', {}).get('median'))} |",
        f"| near-duplicate image pairs (cosine >= {_fmt(thresholds.get('near_duplicate'))}) | "
        f"{_fmt(diversity.get('num_near_duplicates'))} |",
    ]
    pose = report.get("pose")
    if pose:
        lines.append(
            "| median per-identity yaw range, source renders / outputs (degrees) | "
            f"{_fmt(pose['sources']['identity_yaw_range'].get('median'))} / "
            f"{_fmt(pose['outputs']['identity_yaw_range'].get('median'))} |"
        )
    if leakage:
        lines.append(
            f"| identities leaking into gallery {markdown.code(leakage.get('gallery'), table=True)} "
            f"(cosine >= {_fmt(leakage.get('threshold'))}) | {_fmt(leakage.get('num_leaks'))} |"
        )
    else:
        lines.append("| leakage against real identities | not checked (no gallery) |")
    return lines


def restrictions(
    config: dict[str, Any], weights_manifest: dict[str, Any], source_license: str | None
) -> list[str]:
    """The links of the licence chain that forbid commercial use (source first)."""
    restricted = [
        f"{row['component']} ({row['license']})"
        for row in _license_rows(weights_manifest)
        if row["non_commercial"]
    ]
    source = source_license_entry(config, source_license)
    if source["non_commercial"]:
        restricted.insert(0, f"source dataset ({source['license']})")
    return restricted


def render_dataset_card(
    *,
    config: dict[str, Any],
    counts: dict[str, Any],
    report: dict[str, Any] | None,
    weights_manifest: dict[str, Any],
    source_license: str | None,
    lora: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
) -> str:
    """``lora``: config.yaml's record of the LoRA fused into the UNet (None: none);
    ``attributes``: its record of the attributes the images carry (None: none)."""
    license_rows = _license_rows(weights_manifest)
    source = source_license_entry(config, source_license)
    restricted = restrictions(config, weights_manifest, source_license)

    lines = ["# Dataset card", ""]
    if restricted:
        lines += [
            "> **NON-COMMERCIAL USE ONLY.** At least one link in this dataset's licence chain "
            "forbids commercial use: "
            + "; ".join(markdown.text(link) for link in restricted)
            + ". "
            "The generated images and "
            "labels inherit that restriction.",
            "",
        ]
    profile = weights_manifest.get("profile")
    lines += [
        "## What this is",
        "",
        "A photorealistic face-recognition training set generated by digi2real"
        f"{' ' + str(config['version']) if config.get('version') else ''}: every identity of a "
        "graphics-rendered source dataset was re-generated with Arc2Face (Stable Diffusion 1.5 "
        "conditioned on ArcFace identity vectors), and each image was kept only if its ArcFace "
        "embedding stayed close to its target.",
        "",
    ]
    if profile == "tiny":
        lines += [
            "> Generated with the **tiny** weights profile (random weights): a test output, "
            "not a usable dataset. Its images are noise, and its report's figures describe "
            "pixel similarity of noise images, not faces.",
            "",
        ]
    lines += _generation(config, lora)
    lines += _attributes(attributes)
    lines += ["## Counts", "", "| count | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(counts[key])} |" for key in sorted(counts)]
    lines.append("")
    if report:
        lines += ["## Report headline", "", *_headline(report), ""]
        lines.append("Full figures: `report/report.json` (and `report/index.html` when built).")
        lines.append("")
    lines += [
        "## Licence chain",
        "",
        "| link | licence | URL | commercial use |",
        "|---|---|---|---|",
    ]
    source_text = source["license"] or "not recorded: check the source dataset's terms"
    source_flag = (
        "unknown" if not source["known"] else ("no" if source["non_commercial"] else "yes")
    )
    lines.append(
        f"| source dataset | {markdown.text(source_text)} | {markdown.text(source['license_url'] or '')} | "
        f"{source_flag} |"
    )
    for row in license_rows:
        files = ", ".join(markdown.code(path, table=True) for path in row["files"])
        lines.append(
            f"| {markdown.text(row['component'])}: {files} | {markdown.text(row['license'])} | "
            f"{markdown.text(row['license_url'])} | {'no' if row['non_commercial'] else 'yes'} |"
        )
    effective = dump_yaml(_portable_config(config))
    # a fence longer than any run of backticks in the text: nothing inside can close it
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", effective)), default=0))
    lines += ["", "## Effective config", "", f"{fence}yaml", effective.rstrip(), fence, ""]
    return "\n".join(lines)


# the Hub's size buckets (datasets card metadata), by the number of images
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
)


def _attributes(attributes: dict[str, Any] | None) -> list[str]:
    """The card's account of the attributes every image carries."""
    if not attributes:
        return []
    columns = attributes.get("columns") or []
    lines = [
        "## Attributes",
        "",
        f"Every image carries the attributes of the render it was made from (source labels: "
        f"{markdown.text(attributes.get('origin'))}), in `{layout.MANIFEST}`, in "
        f"`{layout.IMAGES}/{layout.IMAGES_METADATA}` (what `datasets` loads) and in "
        f"`{layout.ANNOTATIONS}/<identity>/<k>.json`. Names ending in `_est` are digi2real's "
        "estimates; the others are the source's ground truth.",
        "",
        "Columns: " + ", ".join(markdown.code(name) for name in columns),
        "",
    ]
    if attributes.get("geometry"):
        lines += [
            "Landmarks and masks were carried through the recorded transforms (render -> "
            f"generation frame -> output, `label_matrix`); masks are "
            f"`{layout.ANNOTATIONS}/<identity>/<k>{layout.SIDECAR_MASK}`, 255 outside the render. "
            "`landmark_nme` measures how well the generated face still sits on them.",
            "",
        ]
    for key in ("where", "balance"):
        if attributes.get(key):
            lines += [f"Chosen with {markdown.code(f'--{key} {attributes[key]}')}.", ""]
    return lines


def hub_metadata(
    *,
    config: dict[str, Any],
    counts: dict[str, Any],
    restricted: bool,
    attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The YAML block of a Hugging Face Hub dataset card: licence, task, size, and the data
    files (the ImageFolder root, whose folder names are the identity labels; with attributes,
    its typed metadata file too)."""
    images = int(counts.get("images") or 0)
    size = next((name for bound, name in SIZE_CATEGORIES if images < bound), "n>100M")
    root = (config.get("source") or {}).get("root")
    source = Path(root).name if root else "synthetic renders"
    return {
        "pretty_name": f"digi2real: photorealistic faces from {source}",
        # the chain mixes licences (source data, weights): no single SPDX id describes it
        "license": "other",
        "license_name": "digi2real-licence-chain" + ("-non-commercial" if restricted else ""),
        "license_link": f"{layout.CARD}",
        "task_categories": ["image-classification"],
        "tags": ["face-recognition", "synthetic", *(["non-commercial"] if restricted else [])],
        "size_categories": [size],
        "configs": [
            {
                "config_name": "default",
                "data_files": [
                    {
                        "split": "train",
                        "path": f"{layout.IMAGES}/**/*.jpg"
                        if not attributes
                        else [
                            f"{layout.IMAGES}/**/*.jpg",
                            f"{layout.IMAGES}/{layout.IMAGES_METADATA}",
                        ],
                    }
                ],
            }
        ],
    }


def render_hub_card(**card: Any) -> str:
    """The dataset card as a Hub ``README.md`` (``card``: :func:`render_dataset_card`'s
    keyword arguments): YAML metadata, the card, how to load it."""
    body = render_dataset_card(**card)
    config, counts = card["config"], card["counts"]
    restricted = bool(restrictions(config, card["weights_manifest"], card["source_license"]))
    metadata = hub_metadata(
        config=config, counts=counts, restricted=restricted, attributes=card.get("attributes")
    )
    loading = [
        "## Loading",
        "",
        "```python",
        "import datasets",
        "",
        "# this folder (or its Hub repository): images with their identity as the label",
        'faces = datasets.load_dataset("path/to/this/folder", split="train")',
        "# the same from the ImageFolder root alone",
        f'faces = datasets.load_dataset("imagefolder", data_dir="path/to/{layout.IMAGES}", '
        'split="train")',
        "```",
        "",
        f"Labels are the identity folder names in sorted order, the same integers as "
        f"`{layout.LABELS}` and the manifest's `label` column; `{layout.MANIFEST}` holds "
        "every image's provenance (source renders, interpolation, seed, similarity).",
        "",
    ]
    front = dump_yaml(metadata, sort_keys=False).rstrip()
    return "\n".join(["---", front, "---", "", body.rstrip(), "", *loading])


def write_dataset_card(out_dir: str | Path, **card: Any) -> Path:
    """Write ``OUT/DATASET_CARD.md`` and the Hub ``README.md`` (``card``:
    :func:`render_dataset_card`'s keyword arguments) and return the card's path."""
    paths = OutLayout(out_dir)
    if not paths.root.is_dir():
        raise FileNotFoundError(f"output folder not found: {paths.root}")
    fsio.atomic_write_bytes(paths.hub_card, render_hub_card(**card).encode("utf-8"))
    text = render_dataset_card(**card)
    path = fsio.atomic_write_bytes(paths.card, text.encode("utf-8"))
    logger.info("dataset card written to %s", path)
    return path


def write_card(
    out: str | Path, record: dict[str, Any] | None = None, *, counts: dict[str, int] | None = None
) -> Path:
    """(Re)write ``OUT/DATASET_CARD.md`` from config.yaml (or ``record``), the counts and,
    when a report has been made, its headline figures. Finalisation, ``report`` and ``prune``
    call it."""
    import json

    paths = OutLayout(out)
    if record is None:
        record = read_yaml(paths.config)
    if counts is None:
        manifest = read_table(paths.manifest, columns=["identity"])
        counts = {
            "identities": len(set(manifest.column("identity").to_pylist())),
            "images": manifest.num_rows,
            "rejected": parquet_rows(paths.rejected),
            "errors": parquet_rows(paths.errors),
        }
    report = None
    if paths.report_json.is_file():
        report = json.loads(paths.report_json.read_text(encoding="utf-8"))
    weights = record.get("weights", {})
    # the portable config, plus the source root (the card shows its folder name and reads it
    # to recognise DigiFace-1M's licence); placement stays out so runners give one card
    config = json.loads(json.dumps(record["config"]))
    config["source"]["root"] = merge_environment(record)["source"].get("root")
    return write_dataset_card(
        paths.root,
        config=config,
        counts=counts,
        report=report,
        weights_manifest={"profile": weights.get("profile"), "files": weights.get("files", [])},
        source_license=config["source"].get("license"),
        lora=record.get("lora"),
        attributes=record.get("attributes"),
    )
