"""``digi2real bench``: what generation costs on this device, per mode, and the checks of the
speed options. ``options`` (what to measure), ``measure`` (clocks, peak memory, matmul peak),
``models`` (the benchmarked architecture and its FLOPs), ``modes`` (images/s and FLOPs per
image of the presets), ``paths`` (Arc2Face's naive loop against the engine), ``checks``
(per-call error of speed options, trajectories), ``embedding`` (the embedding stage, planning
memory), ``render`` (tables), ``run`` (the command: sections in order, the result file).
"""

from digi2real.bench.options import BenchOptions

__all__ = ["BenchOptions", "run_bench"]


def __getattr__(name: str):
    # torch and diffusers load with the runner: only when a bench runs
    if name == "run_bench":
        from digi2real.bench.run import run_bench

        return run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
