"""Per-identity interpolation plans on the unit sphere.

Targets are of three kinds: an identity's own embeddings (``source``), spherical interpolation
between two of them with ``t`` drawn per target (``slerp``), and random convex (Dirichlet)
mixtures renormalised to the sphere (``dirichlet``). Every target records the indices of its
source images and their weights. A plan depends only on (run seed, identity name, the
identity's embeddings, the interpolation config) — never on batching or sharding.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from digi2real.config import INTERP_KINDS, InterpolationConfig
from digi2real.data.embeddings import check_embeddings


@dataclass(frozen=True)
class Target:
    index: int  # output index within the identity (0..outputs-1)
    kind: str  # source | slerp | dirichlet
    sources: tuple[int, ...]  # indices into the identity's usable images
    weights: tuple[float, ...]  # interpolation weights (slerp: (1-t, t))
    embedding: np.ndarray  # (D,) float32 unit


def init_source(target: Target) -> int:
    """The position in ``target.sources`` of the render that initialises it (render-guided
    transfer): its own render for a ``source`` target, else the source with the largest
    interpolation weight (the embedding the target is closest to), the first on a tie."""
    return max(range(len(target.weights)), key=lambda i: (target.weights[i], -i))


def stable_seed(*parts: object, bits: int = 63) -> int:
    """A stable hash (blake2b) of ``parts``; strings are NFC-normalised. Never Python's hash()."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        text = unicodedata.normalize("NFC", part) if isinstance(part, str) else repr(part)
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "little") & ((1 << bits) - 1)


def image_seed(run_seed: int, identity: str, index: int, attempt: int) -> int:
    """The noise seed of one output image: a stable hash of (run seed, identity, output index,
    attempt), so an image does not depend on batch size, shard layout or worker count."""
    return stable_seed("image", run_seed, identity, index, attempt)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between unit vectors (linear when nearly parallel)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    dot = float(np.clip(np.dot(a64, b64), -1.0, 1.0))
    omega = np.arccos(dot)
    if omega < 1e-6:
        out = (1 - t) * a64 + t * b64
    elif dot < -1 + 1e-5:
        raise ValueError("slerp between antipodal vectors is undefined")
    else:
        sin = np.sin(omega)
        out = np.sin((1 - t) * omega) / sin * a64 + np.sin(t * omega) / sin * b64
    return (out / np.linalg.norm(out)).astype(np.float32)


def split_counts(total: int, mix: dict[str, float], available: dict[str, bool]) -> dict[str, int]:
    """Largest-remainder split of ``total`` targets over the kinds that are possible."""
    shares = {k: mix.get(k, 0.0) for k in INTERP_KINDS if available[k] and mix.get(k, 0.0) > 0}
    if not shares:
        shares = {"source": 1.0}
    norm = sum(shares.values())
    raw = {k: total * v / norm for k, v in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    remainder = total - sum(counts.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), INTERP_KINDS.index(k)))[:remainder]:
        counts[k] += 1
    return {k: counts.get(k, 0) for k in INTERP_KINDS}


def plan_identity(
    identity: str,
    embeddings: np.ndarray,
    config: InterpolationConfig,
    run_seed: int,
    bins: np.ndarray | None = None,
) -> list[Target]:
    """The targets of one identity from its usable images' embeddings (K, D). ``bins``: each
    image's ``--balance`` bin (-1: none); the targets' dominant renders then come from the
    bins in turn (:func:`balance_targets`)."""
    targets = _plan(identity, embeddings, config, run_seed)
    if bins is None:
        return targets
    rng = np.random.default_rng(stable_seed("balance", run_seed, identity))
    return balance_targets(targets, check_embeddings(embeddings), np.asarray(bins), rng)


def _mix(sources: list[int], weights: tuple[float, ...], embeddings: np.ndarray) -> np.ndarray:
    mixed = np.asarray(weights, np.float64) @ embeddings[sources].astype(np.float64)
    norm = np.linalg.norm(mixed)
    if norm < 1e-6:  # the embeddings cancel out: the dominant one stands in
        return embeddings[sources[int(np.argmax(weights))]].copy()
    return (mixed / norm).astype(np.float32)


def balance_targets(
    targets: list[Target], embeddings: np.ndarray, bins: np.ndarray, rng: np.random.Generator
) -> list[Target]:
    """``targets`` with each one's dominant render (:func:`init_source`) drawn from the
    occupied bins in turn, so the targets per bin differ by at most one; within a bin its
    renders are used in a seeded rotation. The new render takes the dominant position (it
    swaps places with itself when the target already mixes it in), the weights stay, and the
    target embedding is recomputed. Renders in no bin are never dominant."""
    if bins.shape != (embeddings.shape[0],):
        raise ValueError(f"bins must have one entry per image, got {bins.shape}")
    occupied = sorted(int(b) for b in set(bins.tolist()) if b >= 0)
    if not occupied:
        return targets
    members = {b: [int(i) for i in rng.permutation(np.flatnonzero(bins == b))] for b in occupied}
    turns = {b: 0 for b in occupied}
    start = int(rng.integers(len(occupied)))
    balanced = []
    for position, target in enumerate(targets):
        chosen_bin = occupied[(start + position) % len(occupied)]
        render = members[chosen_bin][turns[chosen_bin] % len(members[chosen_bin])]
        turns[chosen_bin] += 1
        sources = list(target.sources)
        dominant = init_source(target)
        if render in sources:
            other = sources.index(render)
            sources[dominant], sources[other] = sources[other], sources[dominant]
        else:
            sources[dominant] = render
        if target.kind == "slerp":
            embedding = slerp(embeddings[sources[0]], embeddings[sources[1]], target.weights[1])
        elif target.kind == "source":
            embedding = embeddings[sources[0]].copy()
        else:
            embedding = _mix(sources, target.weights, embeddings)
        balanced.append(
            Target(target.index, target.kind, tuple(sources), target.weights, embedding)
        )
    return balanced


def _plan(
    identity: str,
    embeddings: np.ndarray,
    config: InterpolationConfig,
    run_seed: int,
) -> list[Target]:
    embeddings = check_embeddings(embeddings, name=f"embeddings of {identity!r}")
    k = embeddings.shape[0]
    rng = np.random.default_rng(stable_seed("plan", run_seed, identity))
    counts = split_counts(
        config.outputs_per_identity,
        config.mix,
        {"source": True, "slerp": k >= 2, "dirichlet": k >= 2},
    )
    targets: list[Target] = []
    order = rng.permutation(k)
    for i in range(counts["source"]):
        src = int(order[i % k])
        targets.append(Target(len(targets), "source", (src,), (1.0,), embeddings[src].copy()))
    lo, hi = config.slerp_t
    for _ in range(counts["slerp"]):
        a, b = (int(x) for x in rng.choice(k, size=2, replace=False))
        t = float(rng.uniform(lo, hi))
        targets.append(
            Target(
                len(targets), "slerp", (a, b), (1.0 - t, t), slerp(embeddings[a], embeddings[b], t)
            )
        )
    for _ in range(counts["dirichlet"]):
        m = min(config.dirichlet_sources, k)
        chosen = np.sort(rng.choice(k, size=m, replace=False))
        weights = rng.dirichlet(np.full(m, config.dirichlet_concentration))
        mixed = weights @ embeddings[chosen].astype(np.float64)
        norm = np.linalg.norm(mixed)
        if norm < 1e-6:
            # embeddings cancel out; the identity's first source stands in
            mixed, chosen, weights = (
                embeddings[chosen[0]].astype(np.float64),
                chosen[:1],
                np.ones(1),
            )
            norm = 1.0
        targets.append(
            Target(
                len(targets),
                "dirichlet",
                tuple(int(c) for c in chosen),
                tuple(float(w) for w in weights),
                (mixed / norm).astype(np.float32),
            )
        )
    return targets
