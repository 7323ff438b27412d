"""Deterministic fault injection for the kill-and-resume and worker-failure tests.

``DIGI2REAL_FAULT=[<kind>:]<point>[@<shard>]`` fires when the process reaches ``point`` (for
that shard; without ``@`` for every shard). Kinds:

- ``kill`` (default): SIGKILL this process, as a power cut or the OOM killer would;
- ``exit``: ``os._exit`` with :data:`EXIT_CODE`, a worker dying without any clean-up;
- ``raise``: :class:`InjectedFault`, an ordinary per-shard error;
- ``enospc`` / ``erofs``: ``OSError`` with that errno, as a full or read-only disk reports;
- ``stall``: sleep for an hour, as a slow model load or a long shard does (the driver-death
  tests kill the driver meanwhile).

``DIGI2REAL_FAULT_ONCE=<path>`` makes the fault transient: it fires only in the first process
that manages to create ``<path>`` (exclusively), so a retried shard then succeeds.
Unset, :func:`point` is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "DIGI2REAL_FAULT"
ENV_PREFIX = "DIGI2REAL_"  # settings every worker sees as the driver does
LOG_LEVEL_ENV = "DIGI2REAL_LOG_LEVEL"  # the driver's log level (-v), for its workers
ONCE_ENV = "DIGI2REAL_FAULT_ONCE"
KINDS = ("kill", "exit", "raise", "enospc", "erofs", "stall")
STALL_SECONDS = 3600
EXIT_CODE = 70
POINTS = (
    "worker-start",  # a local worker or Ray actor about to load its models
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


class InjectedFault(RuntimeError):
    """The error a ``raise:`` fault raises."""


def point(name: str, shard: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    kind, sep, rest = spec.partition(":")
    if not sep:
        kind, rest = "kill", spec
    if kind not in KINDS:
        raise ValueError(f"unknown {ENV} kind {kind!r}; valid: {', '.join(KINDS)}")
    where, _, which = rest.partition("@")
    if where != name or (which and shard is not None and int(which) != shard):
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(EXIT_CODE)
    elif kind == "raise":
        raise InjectedFault(f"injected fault at {name} (shard {shard})")
    elif kind == "stall":
        time.sleep(STALL_SECONDS)
    else:
        code = errno.ENOSPC if kind == "enospc" else errno.EROFS
        raise OSError(code, f"injected {os.strerror(code)} at {name} (shard {shard})")


def worker_environment() -> dict[str, str]:
    """The driver's ``DIGI2REAL_*`` settings, for its workers and actors."""
    return {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}


def adopt_environment(env: dict[str, str]) -> None:
    """Make this worker's ``DIGI2REAL_*`` settings the driver's (a forkserver child inherits
    the server's environment, not the driver's)."""
    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        del os.environ[key]
    os.environ.update(env)


def configure_worker_logging() -> None:
    """A worker logs at its driver's level (``digi2real -v`` reaches workers and actors)."""
    import logging

    from digi2real.data.store import redact_logs

    level = os.environ.get(LOG_LEVEL_ENV, "WARNING")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    redact_logs()
