"""Close the loop: train a face recogniser on a converted set and measure verification accuracy.

``train`` (IResNet + ArcFace/CosFace, resumable, torchrun-ready) and ``verify`` (the
insightface ``.bin`` protocol); :mod:`digi2real.cli.evaluate` holds the argparse wiring.
Imported lazily: ``import digi2real.evaluate`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "digi2real.evaluate.train",
    "TrainResult": "digi2real.evaluate.train",
    "train": "digi2real.evaluate.train",
    "VerificationReport": "digi2real.evaluate.verify",
    "VerificationResult": "digi2real.evaluate.verify",
    "load_bin": "digi2real.evaluate.verify",
    "verify": "digi2real.evaluate.verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
