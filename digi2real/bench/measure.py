"""Measuring tools of the benchmark: device synchronisation, wall clocks per stage, peak
memory, the device's matrix-product peak (the denominator of "fraction of peak")."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

STAGES = ("encode", "denoise", "decode", "postprocess")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> dict[str, float]:
    """Current and peak (since the last :func:`reset_peak_rss`) resident set, MiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values.get("VmRSS", 0.0), "peak_rss_mb": values.get("VmHWM", 0.0)}


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class PeakMemory:
    """Peak GPU memory allocated by torch, or peak RSS on CPU, over a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = rss_mb()["peak_rss_mb"]


class StageClock:
    """Wall seconds per stage; synchronises the device at stage boundaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync(self.device)
        begin = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - begin

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed

    def hook(self, name: str, module: torch.nn.Module) -> list[Any]:
        """Forward hooks timing every call of ``module`` (eager modules only)."""

        def before(*_: Any) -> None:
            sync(self.device)
            self._open[name] = time.perf_counter()

        def after(*_: Any) -> None:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - self._open.pop(name)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def matmul_peak_tflops(device: torch.device, seconds: float = 2.0) -> dict[str, Any]:
    """Measured throughput of one large matrix product: bf16 (fp16 if unsupported) on CUDA,
    fp32 on CPU: the denominator of 'fraction of peak'."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = 8192
    else:
        dtype, n = torch.float32, 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    # best of several short windows: a shared host's other load only ever slows a window down
    best = 0.0
    for _ in range(5):
        iterations, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds / 5:
            for _ in range(5):
                a @ b
            sync(device)
            iterations += 5
        best = max(best, 2 * n**3 * iterations / (time.perf_counter() - begin) / 1e12)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "tflops": best,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
