"""The identity filter: keep a generated image only if it is still its target's identity.

Each target is generated, its output's ArcFace embedding compared with the target embedding
(cosine), and accepted at ``filter.threshold`` or above. A target below it (or whose output
has no detectable face) is retried with the next derived seed, up to ``filter.max_attempts``
attempts, then recorded as rejected. Seeds come from (run seed, identity, output index,
attempt), so the outcome does not depend on batching.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from digi2real.config import Config
from digi2real.face.stack import GeneratedFace
from digi2real.pipeline.interpolate import Target, image_seed, init_source


@dataclass
class Pending:
    identity: str
    target: Target
    source_paths: list[str]
    attempt: int = 0
    seeds: list[int] = field(default_factory=list)
    best: float = -2.0
    reason: str = ""

    @property
    def init_path(self) -> str:
        """The source render that initialises this target (see ``interpolate.init_source``)."""
        return self.source_paths[init_source(self.target)]


@dataclass
class Accepted:
    item: Pending
    similarity: float
    face: GeneratedFace


def generate_with_retries(
    engine: Any,
    pending: list[Pending],
    config: Config,
    on_accept: Callable[[Accepted], None] | None = None,
    init_image: Callable[[Pending], np.ndarray] | None = None,
) -> tuple[list[Accepted], list[Pending], int]:
    """Generate every pending target; a target whose output misses the identity threshold (or
    has no face) is retried with the next derived seed, up to ``filter.max_attempts``.
    ``on_accept`` sees each accepted image as soon as its batch is post-processed (while the
    next batch diffuses). With ``generation.init_strength`` > 0, ``init_image(item)`` gives
    each target's init image (at the generation resolution), loaded batch by batch."""
    strength = config.generation.init_strength
    if strength > 0 and init_image is None:
        raise ValueError("generation.init_strength > 0 needs the targets' init images")
    accepted: list[Accepted] = []
    rejected: list[Pending] = []
    generated = 0
    threshold = config.filter.threshold
    while pending:
        for item in pending:
            item.seeds.append(
                image_seed(config.run.seed, item.identity, item.target.index, item.attempt)
            )
        decided: dict[int, Accepted | None] = {}

        def decide(
            offset: int,
            faces: list[GeneratedFace],
            batch: list[Pending] = pending,
            decided: dict[int, Accepted | None] = decided,
        ) -> None:
            for i, face in enumerate(faces):
                item = batch[offset + i]
                if face.embedding is None:
                    item.reason = face.reason
                    decided[offset + i] = None
                    continue
                similarity = float(np.dot(face.embedding, item.target.embedding))
                if similarity >= threshold:
                    decided[offset + i] = done = Accepted(item, similarity, face)
                    if on_accept is not None:
                        on_accept(done)
                else:
                    item.best = max(item.best, similarity)
                    item.reason = f"similarity below {threshold}"
                    decided[offset + i] = None

        inits = None
        if strength > 0:
            assert init_image is not None
            inits = [functools.partial(init_image, item) for item in pending]
        engine.generate(
            np.stack([p.target.embedding for p in pending]),
            [p.seeds[-1] for p in pending],
            on_faces=decide,
            init_images=inits,
            strength=strength,
        )
        generated += len(pending)
        retry: list[Pending] = []
        for i, item in enumerate(pending):
            done = decided[i]
            if done is not None:
                accepted.append(done)
                continue
            item.attempt += 1
            (retry if item.attempt < config.filter.max_attempts else rejected).append(item)
        pending = retry
    accepted.sort(key=lambda a: (a.item.identity, a.item.target.index))
    rejected.sort(key=lambda p: (p.identity, p.target.index))
    return accepted, rejected, generated
