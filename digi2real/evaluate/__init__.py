"""Close the loop: train a face recogniser on a converted set and measure verification accuracy.

``train`` (IResNet + ArcFace/CosFace, resumable, torchrun-ready) and ``verify`` (the
insightface ``.bin`` protocol); :mod:`digi2real.cli.evaluate` holds the argparse wiring.
"""

from digi2real.evaluate.train import TrainConfig, TrainResult, train
from digi2real.evaluate.verify import VerificationReport, VerificationResult, load_bin, verify

__all__ = [
    "TrainConfig",
    "TrainResult",
    "VerificationReport",
    "VerificationResult",
    "load_bin",
    "train",
    "verify",
]
