"""The bundled demo sample (see README.md here): a tiny DigiFace-1M-layout dataset."""

from __future__ import annotations

from pathlib import Path


def digiface_root() -> Path:
    """Folder of the bundled sample: ``<identity>/<n>.png``, aligned 112x112 renders."""
    root = Path(__file__).resolve().parent / "digiface"
    if not root.is_dir():
        raise FileNotFoundError(
            f"bundled sample missing at {root}; regenerate with scripts/make_sample.py"
        )
    return root
