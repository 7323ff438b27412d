"""Deterministic fault injection for the kill-and-resume tests.

``DIGI2REAL_FAULT=<point>[@<shard>]`` makes the process SIGKILL itself when it reaches that
point (for that shard). Unset, :func:`point` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DIGI2REAL_FAULT"
POINTS = (
    "shard-start",
    "shard-embedded",
    "shard-generated",
    "shard-images-written",
    "shard-before-commit",
    "shard-committed",
    "finalize-start",
    "finalize-parts",
    "finalize-formats",
)


def point(name: str, shard: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, which = spec.partition("@")
    if where != name or (which and shard is not None and int(which) != shard):
        return
    os.kill(os.getpid(), signal.SIGKILL)
