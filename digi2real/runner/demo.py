"""``digi2real demo``: the tiny profile on the bundled sample, converted and reported."""

from __future__ import annotations

import time
from pathlib import Path

from digi2real.analysis.card import write_card
from digi2real.analysis.report import build_report
from digi2real.config import Config
from digi2real.data import layout
from digi2real.data.layout import OutLayout
from digi2real.runner.convert import convert
from digi2real.sample import digiface_root


def run_demo(out: Path, *, weights: Path | None = None, quiet: bool = False) -> list[str]:
    """Tiny profile (built if absent) on the bundled sample, then its report with contact
    sheets of the source renders beside their outputs."""
    from digi2real.weights import ensure_tiny

    start = time.perf_counter()
    tiny = ensure_tiny(weights)
    config = Config.preset_named("tiny").override(
        {
            "weights": str(tiny.root),
            "source.root": str(digiface_root()),
            "source.license": "digi2real bundled sample (Apache-2.0, drawn by scripts/make_sample.py)",
        }
    )
    summary = convert(config, out, overwrite=True, progress=not quiet)
    report = build_report(out, html=True)
    write_card(out)
    paths = OutLayout(out)
    sheets = [paths.report / name for name in report["contact_sheets"]]
    return [
        f"demo finished in {time.perf_counter() - start:.1f}s",
        *summary.lines(),
        f"contact sheet:     {sheets[0] if sheets else '(none)'}",
        f"report:            {paths.report / layout.REPORT_HTML}",
        f"dataset card:      {paths.card}",
    ]
