"""What a ``digi2real bench`` run measures: one typed set of options (the command's flags map
onto it one to one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The presets a user chooses between for cost: the paper's, the fast ones, the few-step one.
DEFAULT_MODES = ("default", "fast", "fast20", "fast15", "fast4")
METHODS = ("auto", "end-to-end", "composed")
VARIANTS = ("channels_last", "half", "fp16", "bf16", "compile")
EMBED_ARCHS = ("r100", "r50", "r18")


@dataclass
class BenchOptions:
    profile: str = "full-random"  # full-random | tiny | real (with weights)
    weights: Path | None = None
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    dtype: str | None = None  # the models' dtype for the paths/checks (default per device)
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's choice)
    out: Path | None = None  # the result file (default: runner.cost.default_bench_file())
    # -- modes: images/s and FLOPs per image of presets at a batch size and dtype
    modes: tuple[str, ...] = DEFAULT_MODES
    method: str = "auto"  # auto: end-to-end on CUDA, composed elsewhere
    batch_size: int | None = None  # None: each preset's own (composed on CPU: 1)
    mode_dtype: str | None = None  # None: each preset's own (CPU: float32)
    mode_images: int = 32  # images per mode, end-to-end
    mode_compile: str | None = None  # on | off; None: each preset's own (CUDA only)
    repeats: int = 3  # timed calls per measurement, composed
    # -- the naive loop (Arc2Face's README) against the engine, as before digi2real bench
    naive: bool = False
    images: int = 16
    batch_sizes: list[int] = field(default_factory=lambda: [16])
    steps: int = 25
    guidance: float = 3.0
    compile: bool = False
    engine_dtypes: list[str] | None = None
    no_channels_last: bool = False
    # -- per-call speed options against fp32, full trajectories on tiny
    variants: list[str] = field(default_factory=list)
    variant_batch: int = 2
    trajectories: bool = False
    # -- the embedding stage and planning memory
    embedding: bool = False
    embed_arch: str = "r100"
    embed_batch: int | None = None
    embed_seconds: float = 2.0
    no_onnx: bool = False
    plan_images: int = 0

    def __post_init__(self) -> None:
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.profile == "real" and self.weights is None:
            raise ValueError("--profile real needs --weights DIR")
        if self.mode_compile not in (None, "on", "off"):
            raise ValueError(f"--mode-compile must be on or off, got {self.mode_compile!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; valid: {', '.join(METHODS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown --variants {unknown}; valid: {', '.join(VARIANTS)}")
        if self.embed_arch not in EMBED_ARCHS:
            raise ValueError(f"--embed-arch must be one of {', '.join(EMBED_ARCHS)}")
        for name in ("images", "steps", "variant_batch", "repeats", "mode_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if min(self.batch_sizes) < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
        if self.embed_batch is None:
            self.embed_batch = 256 if self.device.startswith("cuda") else 16

    @property
    def resolved_method(self) -> str:
        if self.method != "auto":
            return self.method
        return "end-to-end" if self.device.startswith("cuda") else "composed"
