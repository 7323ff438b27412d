"""Small helpers shared by tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (following nothing), by relative path; folders
    (empty ones included) as ``<dir>``: a listing and its bytes in one comparable value."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            found[Path(dirpath, name).relative_to(root).as_posix() + "/"] = "<dir>"
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                found[path.relative_to(root).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return found


def tiny_convert(weights: Path, src: Path | str, out: Path | str, *extra: str) -> list[str]:
    """The argv of the cheapest tiny conversion (2 outputs per identity, 1 step, quiet)."""
    return [
        "convert",
        str(src),
        str(out),
        "--weights",
        str(weights),
        "--outputs-per-identity",
        "2",
        "--steps",
        "1",
        "-q",
        *extra,
    ]
