"""What a run of shards came to, and which failures no retry can fix: shared by every runner."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from digi2real.data.fsio import OutputWriteError
from digi2real.runner.shard import ShardResult

FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass
class RunOutcome:
    results: list[ShardResult] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error, after retries
    # shard -> the worker of each attempt, in order (``"in-process"``, ``"worker-1 (cuda:1)"``)
    attempts: dict[int, list[str]] = field(default_factory=dict)


def is_fatal(error: BaseException) -> bool:
    """Errors no retry can fix: the output cannot take more bytes."""
    return isinstance(error, OSError) and error.errno in FATAL_ERRNOS


def fatal_error(code: int, message: str) -> OutputWriteError:
    """The driver-side error for a fatal failure reported by a worker or actor."""
    return OutputWriteError(code, message)
