"""User text reaches the generated documents as text, never as markup: the dataset card, the
Hub README (its YAML metadata too) and the HTML report, with a licence, config values, file,
gallery and identity names that try to add a heading, a table row, a link, a script, or to
close a code block."""

from __future__ import annotations

import html
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import test_report
import yaml

from digi2real.analysis.card import write_dataset_card
from digi2real.analysis.report import build_report
from digi2real.data.embeddings import rows_path
from digi2real.data.layout import CARD, HUB_CARD

LICENCE = (
    "CC-BY-NC-4.0\n# Injected\n| a | b |\n<script>alert(1)</script>\n```\n"
    "[click](javascript:alert(1)) & \\| more"
)
# identity folder names (no "/"), sorted as the synthetic OUT labels them
NAMES = sorted(
    [
        "# Injected",
        "*bold* _it_",
        "<script>alert(1)",
        "[link](javascript:alert(1))",
        "a|b|c",
        "back`tick`",
        "c & d <b>",
        "plain",
    ]
)
LEAKED = "<img src=x onerror=alert(1)>"  # the gallery identity an output leaks into
GALLERY_NAMES = ["g|1", "g`2`", "</td><script>x</script>", LEAKED, "h"]
GALLERY_FILE = "gal`le|ry <b>.npy"
SOURCE_ROOT = "/data/evil\nlicense: mit\n---\n# Injected"
CONFIG = {
    "preset": "tiny\n```\n# Injected\n| a | b |",  # a top-level value: continued at 2 spaces
    "source": {"root": SOURCE_ROOT, "license": LICENCE},
    "generation": {"sampler": "dpmsolver++", "steps": 2, "guidance": 3.0, "decoder": "vae"},
}
WEIGHTS = {
    "profile": "real",
    "files": [
        {
            "path": "unet/diffusion_pytorch_model.safetensors",
            "component": "unet",
            "license": "MIT",
            "license_url": "https://example.org/arc2face",
            "commercial": True,
        },
        {
            "path": "evil`|x\n# Injected.onnx",
            "component": "recognizer|x",
            "license": "MIT\n## Injected\n<img src=x onerror=alert(1)>",
            "license_url": "https://example.org/<y>|z",
            "commercial": False,
        },
    ],
}
LORA = {"name": "lora`|x\n# Injected", "sha256": "ab" * 32, "scale": 1.0}
ATTRIBUTES = {
    "origin": "a|b\n# Injected <b>",
    "columns": ["yaw", "x`|y"],
    "geometry": False,
    "where": "yaw > 0\n# Injected",
    "balance": "yaw:3 `x`",
}
HEADINGS = [
    "# Dataset card",
    "## What this is",
    "## Generation",
    "## Attributes",
    "## Counts",
    "## Report headline",
    "## Licence chain",
    "## Effective config",
]
HTML_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "b", "code",
    "table", "thead", "tbody", "tr", "th", "td", "img", "br",
}  # fmt: skip


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> dict[str, str]:
    """A hand-built OUT with hostile identity and gallery identity names (no models), its
    report with the HTML page, and the card and Hub README of the hostile config."""
    root = tmp_path_factory.mktemp("escaping")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "NAMES": NAMES,
            "GALLERY_NAMES": GALLERY_NAMES,
            "COLLIDING": (NAMES[2], NAMES[5]),
            "LEAKING": (NAMES[6], LEAKED),
            "DUPLICATE_IDENTITY": NAMES[1],
            "SOURCE_GONE": NAMES[7],
        }.items():
            patch.setattr(test_report, name, value)
        synthetic = test_report.make_synthetic_out(root)
    gallery = synthetic.gallery.with_name(GALLERY_FILE)
    shutil.copy(synthetic.gallery, gallery)
    shutil.copy(rows_path(synthetic.gallery), rows_path(gallery))
    report = build_report(synthetic.out, gallery=gallery, html=True, identities_per_sheet=4)
    assert report["leakage"]["leaks"] and report["separation"]["collisions"]
    write_dataset_card(
        synthetic.out,
        config=CONFIG,
        counts={"identities": len(NAMES), "images": 32},
        report=report,
        weights_manifest=WEIGHTS,
        source_license=LICENCE,
        lora=LORA,
        attributes=ATTRIBUTES,
    )
    return {
        "card": (synthetic.out / CARD).read_text(encoding="utf-8"),
        "readme": (synthetic.out / HUB_CARD).read_text(encoding="utf-8"),
        "html": (synthetic.out / "report" / "index.html").read_text(encoding="utf-8"),
    }


def _markdown(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """CommonMark's split of ``text`` into lines outside fenced code blocks and the blocks
    (info string, content): a fence closes only with as many backticks as it opened with."""
    prose, blocks, fence, info, content = [], [], None, "", []
    for line in text.split("\n"):
        if fence is None:
            opening = re.match(r" {0,3}(`{3,})([^`]*)$", line)
            if opening:
                fence, info, content = opening.group(1), opening.group(2).strip(), []
            else:
                prose.append(line)
        elif re.fullmatch(r" {0,3}" + fence + r"`*\s*", line):
            blocks.append((info, "\n".join(content)))
            fence = None
        else:
            content.append(line)
    assert fence is None, "a code block is left open"
    return prose, blocks


def _cells(row: str) -> int:
    """GFM's count of a table row's cells: a ``|`` splits unless an odd number of
    backslashes precedes it (code spans do not protect it)."""
    return len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) - 1


def _check_markdown(text: str, headings: list[str], fences: list[str]) -> None:
    prose, blocks = _markdown(text)
    assert [line for line in prose if line.startswith("#")] == headings
    assert not [line for line in prose if line.lstrip().startswith(("# Inj", "## Inj", "| a "))]
    # user text in code spans has no backtick (it becomes '): a span is one `...`
    outside_spans = [re.sub(r"`[^`]*`", "", line) for line in prose]
    assert not [line for line in outside_spans if "<" in line], "raw HTML in the Markdown"
    assert not [line for line in outside_spans if re.search(r"(?<!\\)\[click(?<!\\)\]", line)]
    table: list[int] = []
    for line in [*prose, ""]:
        if line.startswith("|"):
            table.append(_cells(line))
        elif table:
            assert len(set(table)) == 1, f"rows with {table} cells"
            table = []
    assert [info for info, _ in blocks] == fences
    config = yaml.safe_load(blocks[0][1])
    assert config["preset"] == CONFIG["preset"] and config["source"]["license"] == LICENCE


def test_the_card_shows_user_text_as_text(documents) -> None:
    card = documents["card"]
    _check_markdown(card, HEADINGS, ["yaml"])
    lines = card.split("\n")
    notice = next(line for line in lines if line.startswith("> **NON-COMMERCIAL"))
    assert "source dataset (CC-BY-NC-4.0 # Injected \\| a \\| b \\| &lt;script&gt;" in notice
    source = next(line for line in lines if line.startswith("| source dataset |"))
    assert "\\[click\\](javascript:alert(1)) &amp; \\\\\\| more |" in source
    assert "| identities leaking into gallery `gal'le\\|ry <b>.npy` " in card
    assert "| LoRA | `lora'\\|x # Injected` (sha256 abababababababab..., scale 1), fused |" in card


def test_ordinary_text_is_written_as_it_is() -> None:
    from digi2real.analysis.card import render_dataset_card

    card = render_dataset_card(
        config={**CONFIG, "preset": "tiny", "source": {"root": "/data/src", "license": "MIT"}},
        counts={"images": 32},
        report=None,
        weights_manifest={"profile": "real", "files": WEIGHTS["files"][:1]},
        source_license="MIT",
        lora={**LORA, "name": "lcm"},
        attributes={**ATTRIBUTES, "origin": "facesynthetics", "columns": ["yaw", "pitch"]},
    )
    assert "| sampler | dpmsolver++, 2 steps, guidance 3.0 |" in card
    assert "| LoRA | `lcm` (sha256 abababababababab..., scale 1), fused |" in card
    assert "| source dataset | MIT |  | yes |" in card
    assert (
        "| unet: `unet/diffusion_pytorch_model.safetensors` | MIT | https://example.org/arc2face "
        "| yes |"
    ) in card
    assert "(source labels: facesynthetics)" in card and "Columns: `yaw`, `pitch`" in card
    assert "\n```yaml\ngeneration:\n" in card and "\n```\n" in card  # the usual fence


def test_the_hub_readme_metadata_is_yaml_and_its_body_text(documents) -> None:
    readme = documents["readme"]
    assert readme.startswith("---\n")
    front, body = readme[len("---\n") :].split("\n---\n", 1)
    metadata = yaml.safe_load(front)
    assert list(metadata) == [
        "pretty_name", "license", "license_name", "license_link", "task_categories", "tags",
        "size_categories", "configs",
    ]  # fmt: skip
    assert metadata["license"] == "other"
    assert (
        metadata["pretty_name"] == "digi2real: photorealistic faces from " + Path(SOURCE_ROOT).name
    )
    _check_markdown(body, [*HEADINGS, "## Loading"], ["yaml", "python"])


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        names = [name for name, _ in attrs]
        assert names in ([], ["src", "alt"], ["class"], ["lang"], ["charset"]), (tag, attrs)

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_the_html_report_shows_names_as_text(documents) -> None:
    page = documents["html"]
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= HTML_TAGS, parser.tags - HTML_TAGS
    assert "<script" not in page and "<img src=x" not in page
    text = "".join(parser.text)
    for name in (*NAMES[:7], LEAKED, GALLERY_FILE):
        assert name in text, name  # shown, as text
    assert html.escape(NAMES[NAMES.index("<script>alert(1)")]) in page


def test_verification_table_escapes_model_and_set_names() -> None:
    from digi2real.evaluate.verify import VerificationReport, VerificationResult

    result = VerificationResult("x", "lfw | fake\n# Injected", 0.9, 0.01, 10, [0.9], [0.5])
    report = VerificationReport(
        model="<script>alert(1)</script>\n| a | b |",
        results=[result],
        preprocessing={
            "color": "RGB",
            "input_size": 112,
            "mean": [127.5] * 3,
            "std": [127.5] * 3,
            "source": "face.json\n# Injected",
        },
    )
    lines = report.to_markdown().splitlines()
    assert [_cells(line) for line in lines[:3]] == [3, 3, 3]  # Model, one set, Avg
    assert not [line for line in lines if line.startswith("#") or "<script" in line]
    assert lines[4].startswith("Preprocessing: RGB 112x112") and "face.json # Injected" in lines[4]
