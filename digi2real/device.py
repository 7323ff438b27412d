"""Where torch work runs: the device names of the config, their dtype, and thread counts.

The thread rule is the same from the CLI and from Python: torch runs ``run.torch_threads``
intra-op threads per worker (default 1, ``--threads N``), because CPU kernels split their
work by thread count and the output bytes must not depend on the host. A worker process sets
it for its lifetime; an in-process run (``digi2real convert``, ``Digi2Real.convert`` and
``.augment``) sets it for the call and restores the caller's count afterwards.
"""

from __future__ import annotations

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


def devices_for(config: Config) -> list[str]:
    """The local workers' devices of ``run.devices`` (``0,1``, ``all``, ``cpuxN``); empty
    when unset (one in-process worker on ``run.device``)."""
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
        _, _, n = spec.partition("x")
        return ["cpu"] * int(n or 1)
    devices = []
    for part in spec.split(","):
        if not part.strip().isdigit():
            raise ValueError(f"bad --devices entry {part!r}; use e.g. 0,1 or all or cpux2")
        devices.append(f"cuda:{int(part)}")
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
