"""Small helpers shared by tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import numpy as np


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
