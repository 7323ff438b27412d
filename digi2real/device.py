"""Where torch work runs: the device names of the config, their dtype, and thread counts.

The thread rule is the same from the CLI and from Python: torch runs ``run.torch_threads``
intra-op threads per worker (default 1, ``--threads N``), because CPU kernels split their
work by thread count and the output bytes must not depend on the host. A worker process sets
it for its lifetime; an in-process run (``digi2real convert``, ``Digi2Real.convert`` and
``.augment``) sets it for the call and restores the caller's count afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from digi2real.config import Config

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a CUDA name without a GPU and
    an unknown name are errors."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; valid: {DEVICE_CHOICES}")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    # half precision convolutions on CPU are slow or unsupported; CPU runs are float32
    return "float32" if device == "cpu" else dtype


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def devices_for(config: Config) -> list[str]:
    """The local workers' devices of ``run.devices`` (``0,1``, ``all``, ``cpuxN``); empty
    when unset (one in-process worker on ``run.device``). Each worker is a process holding the
    whole model stack: ``cpuxN`` is bounded by the CPUs, GPU indices by the GPUs torch sees,
    and no GPU is named twice."""
    spec = config.run.devices
    if spec is None:
        return []
    if spec == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("--devices all: torch sees no CUDA device")
        return [f"cuda:{i}" for i in range(count)]
    if spec.startswith("cpu"):
        return ["cpu"] * _cpu_workers(spec)
    indices = []
    for part in spec.split(","):
        if not part.strip().isdigit():
            raise ValueError(f"bad --devices entry {part!r}; use e.g. 0,1 or all or cpux2")
        indices.append(int(part))
    if len(set(indices)) != len(indices):
        raise ValueError(f"--devices {spec}: a GPU is named twice (one worker per GPU)")
    import torch

    count = torch.cuda.device_count()
    if max(indices) >= count:
        seen = f"GPUs 0-{count - 1}" if count else "no CUDA device"
        raise ValueError(f"--devices {spec}: torch sees {seen}")
    return [f"cuda:{i}" for i in indices]


def _cpu_workers(spec: str) -> int:
    """N of ``cpu`` / ``cpuxN``: 1 to the CPU count (each worker runs at least one thread)."""
    head, _, count = spec.partition("x")
    cpus = available_cpus()
    if head != "cpu" or not (count or "1").isdigit() or not 1 <= int(count or 1) <= cpus:
        raise ValueError(
            f"--devices {spec}: CPU workers are cpuxN with N from 1 to {cpus} (this machine's "
            "CPUs; each worker loads the whole model stack)"
        )
    return int(count or 1)


def check_resources(config: Config) -> list[str]:
    """The local workers' devices (:func:`devices_for`), after checking that they and their
    torch threads fit this machine (Ray places workers on its own nodes: their threads are not
    this machine's): one line naming the flag otherwise."""
    devices = devices_for(config)
    threads, cpus = config.run.torch_threads, available_cpus()
    if config.run.runner == "local" and threads > cpus:
        raise ValueError(
            f"--threads {threads}: this machine has {cpus} CPU(s); use at most {cpus} "
            "(run.torch_threads, per worker)"
        )
    return devices


def set_threads(threads: int) -> None:
    """torch's intra-op threads of this process (fixed per worker: CPU kernels partition
    work by thread count, so results must not depend on the host's core count)."""
    import torch

    torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """:func:`set_threads` for the duration of a call, then the caller's count again (the
    Python API runs inside someone else's process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
