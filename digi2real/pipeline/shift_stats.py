"""``digi2real stats real|synthetic``: domain-shift statistics of a folder of face images or of
precomputed ArcFace embeddings, through the weights' Arc2Face encoder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from digi2real.config import Config
from digi2real.data.embeddings import load_embeddings
from digi2real.face.images import embedding_batches as image_batches
from digi2real.face.stack import FaceStack
from digi2real.pipeline.conditioning import IdentityEncoder
from digi2real.pipeline.domain_shift import ConditioningStats, compute_stats, embedding_batches
from digi2real.weights import open_weights


def compute_stats_from(
    config: Config, src: str | Path, kind: str, out: str | Path
) -> ConditioningStats:
    """``digi2real stats real|synthetic``: stats of a folder of face images (any depth) or of a
    ``.npy`` of ArcFace embeddings, with the config's weights, saved to ``out``."""
    if config.weights is None:
        raise ValueError("no weights: pass --weights DIR")
    src = Path(src)
    faces = FaceStack.from_config(config)
    encoder = IdentityEncoder.from_weights(
        open_weights(config.weights), id_dim=faces.id_dim, device=faces.device
    )
    if src.suffix == ".npy":
        batches = embedding_batches(load_embeddings(src, mmap=True).embeddings, 256)
    elif src.is_dir():
        batches = image_batches(faces, src)
    else:
        raise FileNotFoundError(f"not a folder of images or a .npy file: {src}")
    stats = compute_stats(
        batches,
        encoder.encode,
        kind=kind,
        encoder_digest=encoder.digest,
        source=str(src),
        created_by=shlex.join(["digi2real", *sys.argv[1:]]),
    )
    stats.save(out)
    return stats
