"""Render a report's index.html to a PNG with headless Chromium (a manual check, not CI).

    .venv/bin/python scripts/render_report.py OUT/report/index.html out.png [--width 1400]

Needs Debian's Chromium: ``apt-get install chromium`` (binary ``chromium``; other
distributions name it ``chromium-browser`` or ``google-chrome``, all accepted). The page
is loaded from a ``file://`` URL, so relative image links resolve against its folder, just
as when it is opened in a browser; networking and profile sync are off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        f"no headless browser found (looked for {', '.join(BROWSERS)}); "
        "install one with `apt-get install chromium`"
    )


def render(
    page: Path, png: Path, *, width: int = 1400, height: int = 4000, timeout: int = 120
) -> Path:
    page = page.resolve()
    if not page.is_file():
        raise FileNotFoundError(f"page not found: {page}")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="digi2real-chromium-") as profile:
        command = [
            find_browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            page.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not png.is_file():
        raise RuntimeError(
            f"chromium exited with {result.returncode} and wrote no {png.name}:\n{result.stderr}"
        )
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="OUT/report/index.html")
    parser.add_argument("png", type=Path, help="screenshot to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args(argv)
    png = render(args.page, args.png, width=args.width, height=args.height)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
