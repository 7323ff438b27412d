"""One typed config. Presets live in ``configs/*.yaml`` (shipped inside the package too).

Fields are grouped by stage. :data:`FREE_FIELDS` may change on an existing output (batch size,
devices, runner...); any other difference is refused because it changes the output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).with_name("configs")
FORMATS = ("imagefolder", "webdataset", "recordio")
# The one definition: pipeline.domain_shift derives its methods (all but the off switch "none")
# and positions from these.
SHIFT_METHODS = ("none", "mean_shift", "moment_match")
SHIFT_POSITIONS = ("all", "varying")
FALLBACKS = ("none", "center_crop")
RUNNERS = ("local", "ray")
INTERP_KINDS = ("source", "slerp", "dirichlet")
SAMPLERS = ("dpmsolver++",)
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class SourceConfig:
    root: str | None = None
    identities: str = "all"  # all | first:N | START:STOP | a,b,c | @file.txt
    min_images: int = 1
    license: str | None = None  # licence of the source dataset, for the dataset card


@dataclass
class InterpolationConfig:
    outputs_per_identity: int = 20
    # share of each kind among an identity's targets; rounded per identity, deterministic
    mix: dict[str, float] = field(
        default_factory=lambda: {"source": 0.2, "slerp": 0.5, "dirichlet": 0.3}
    )
    dirichlet_concentration: float = 1.0
    dirichlet_sources: int = 3  # how many of the identity's embeddings a mixture draws on
    slerp_t: tuple[float, float] = (0.2, 0.8)  # t ~ U(lo, hi) per target


@dataclass
class GenerationConfig:
    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance: float = 3.0
    dtype: str = "float16"
    batch_size: int = 16  # targets per UNet call (x2 for guidance); performance only
    channels_last: bool = True
    compile: bool = False
    overlap: bool = True  # post-process batch k on a thread while batch k+1 diffuses


@dataclass
class ShiftConfig:
    method: str = "none"
    alpha: float = 0.0
    positions: str = "all"
    real_stats: str | None = None
    synthetic_stats: str | None = None
    required: bool = False  # the paper preset: refuse to run without statistics

    @property
    def enabled(self) -> bool:
        """Whether conditioning is shifted at all (alpha = 0 short-circuits)."""
        return self.method != "none" and self.alpha > 0


@dataclass
class FilterConfig:
    # cosine(ArcFace(generated), target). Arc2Face's identity similarity on its own outputs is
    # ~0.5-0.7 with the same ArcFace; 0.4 is well above the impostor distribution of ArcFace
    # R100 (same-person threshold at FAR 1e-4 is ~0.3), so an accepted image is the same
    # identity with margin while most pose/expression variation survives.
    threshold: float = 0.4
    max_attempts: int = 3
    fallback: str = "none"  # none | center_crop (tiny profile only)


@dataclass
class OutputConfig:
    formats: list[str] = field(default_factory=lambda: ["imagefolder"])
    shard_size: int = 64  # identities per shard
    jpeg_quality: int = 95
    # also keep the generated image at the model's resolution (512x512 with real weights) as
    # originals/<identity>/<k>.jpg beside the aligned 112x112 training crop
    keep_original: bool = False


@dataclass
class ReportConfig:
    # A stricter judge for `digi2real report` than the generation's recognizer: an ONNX
    # ArcFace-style model (N,3,S,S) -> (N,D) and its preprocessing (same fields as face.json's
    # recognizer section). None: the report uses the embeddings stored by the run.
    recognizer: str | None = None
    input_size: int = 112
    color: str = "RGB"
    mean: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    std: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: str | None = None  # local multi-GPU: "0,1" or "all"
    runner: str = "local"
    ray_address: str | None = None
    torch_threads: int = 1  # per worker, fixed for CPU determinism
    max_shard_retries: int = 2


@dataclass
class Config:
    weights: str | None = None
    preset: str = "default"
    source: SourceConfig = field(default_factory=SourceConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return cls.from_dict(data)

    @classmethod
    def preset_named(cls, name: str) -> Config:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            valid = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(valid)}")
        return cls.from_yaml(path)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["interpolation"]["slerp_t"] = list(data["interpolation"]["slerp_t"])
        return data

    def override(self, dotted: dict[str, Any]) -> Config:
        """A copy with ``{"generation.steps": 20, ...}`` applied (None values ignored)."""
        data = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise ValueError(f"unknown config field {key!r}")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"unknown config field {key!r}")
            node[leaf] = value
        return Config.from_dict(data)

    # -- validation --------------------------------------------------------------------------

    def validate(self) -> Config:
        _choice("generation.sampler", self.generation.sampler, SAMPLERS)
        _choice("generation.dtype", self.generation.dtype, DTYPES)
        _choice("shift.method", self.shift.method, SHIFT_METHODS)
        _choice("shift.positions", self.shift.positions, SHIFT_POSITIONS)
        _choice("filter.fallback", self.filter.fallback, FALLBACKS)
        _choice("run.runner", self.run.runner, RUNNERS)
        for fmt in self.output.formats:
            _choice("output.formats", fmt, FORMATS)
        if "imagefolder" not in self.output.formats:
            raise ValueError(
                "output.formats must include 'imagefolder': the per-shard image store the "
                f"other formats are assembled from (got {self.output.formats})"
            )
        if len(set(self.output.formats)) != len(self.output.formats):
            raise ValueError(f"output.formats has duplicates: {self.output.formats}")
        _positive("interpolation.outputs_per_identity", self.interpolation.outputs_per_identity)
        _positive("generation.steps", self.generation.steps)
        _positive("generation.batch_size", self.generation.batch_size)
        _positive("filter.max_attempts", self.filter.max_attempts)
        _positive("output.shard_size", self.output.shard_size)
        _positive("source.min_images", self.source.min_images)
        _positive("run.torch_threads", self.run.torch_threads)
        if not 1 <= self.output.jpeg_quality <= 100:
            raise ValueError(
                f"output.jpeg_quality must be in 1..100, got {self.output.jpeg_quality}"
            )
        if not math.isfinite(self.generation.guidance) or self.generation.guidance < 1:
            raise ValueError(f"generation.guidance must be >= 1, got {self.generation.guidance}")
        if not math.isfinite(self.filter.threshold) or not -1 <= self.filter.threshold <= 1:
            raise ValueError(
                f"filter.threshold must be a cosine in [-1, 1], got {self.filter.threshold}"
            )
        mix = self.interpolation.mix
        for kind, share in mix.items():
            _choice("interpolation.mix", kind, INTERP_KINDS)
            if not (math.isfinite(share) and share >= 0):
                raise ValueError(f"interpolation.mix[{kind!r}] must be >= 0, got {share}")
        if sum(mix.values()) <= 0:
            raise ValueError("interpolation.mix must give some kind a positive share")
        lo, hi = self.interpolation.slerp_t
        if not 0 <= lo <= hi <= 1:
            raise ValueError(
                f"interpolation.slerp_t must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}"
            )
        if self.interpolation.dirichlet_concentration <= 0:
            raise ValueError("interpolation.dirichlet_concentration must be > 0")
        if self.interpolation.dirichlet_sources < 2:
            raise ValueError("interpolation.dirichlet_sources must be >= 2")
        if not math.isfinite(self.shift.alpha) or self.shift.alpha < 0:
            raise ValueError(f"shift.alpha must be a finite number >= 0, got {self.shift.alpha}")
        if self.shift.enabled:
            missing = [
                name
                for name in ("real_stats", "synthetic_stats")
                if getattr(self.shift, name) is None
            ]
            if missing:
                raise ValueError(
                    f"shift.method={self.shift.method} needs {' and '.join('shift.' + m for m in missing)}: "
                    "compute them with `digi2real stats real SRC --out real.stats` and "
                    "`digi2real stats synthetic SRC --out synth.stats` (see docs/domain-shift.md)"
                )
        if self.shift.required and not self.shift.enabled:
            raise ValueError(
                f"preset {self.preset!r} requires the domain shift (shift.required): set "
                "shift.real_stats and shift.synthetic_stats (compute them with `digi2real stats "
                "real SRC --out real.stats` / `digi2real stats synthetic SRC --out synth.stats`, "
                "see docs/domain-shift.md), or pass --no-shift to run without it"
            )
        return self


# How and where a run executed: recorded in config.yaml's environment section, not its
# config, so one conversion run on different runners, devices or batch sizes writes
# identical files outside that section.
PLACEMENT_FIELDS = (
    "generation.batch_size",
    "generation.compile",
    "generation.channels_last",
    "generation.overlap",
    "run.device",
    "run.devices",
    "run.runner",
    "run.ray_address",
    "run.max_shard_retries",
)

# Fields that may change on an existing output: placement (float rounding of batched kernels
# aside, no output byte depends on it), paths whose content is checked by digest instead
# (weights, stats), and what only the report or the card reads.
FREE_FIELDS = frozenset(PLACEMENT_FIELDS) | {
    "weights",
    "preset",
    "source.root",
    "source.license",
    "shift.real_stats",
    "shift.synthetic_stats",
    "shift.required",
    "report.recognizer",
    "report.input_size",
    "report.color",
    "report.mean",
    "report.std",
}


# Paths of the machine that ran the conversion: also recorded under the environment, so
# config.yaml's config section (and the dataset card rendered from it) holds no host paths.
HOST_PATH_FIELDS = (
    "weights",
    "source.root",
    "shift.real_stats",
    "shift.synthetic_stats",
    "report.recognizer",
)


def split_environment(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(portable config, {"placement": ..., "paths": ...}) from ``Config.to_dict()``; the
    inverse is :func:`merge_environment`."""
    import copy

    data = copy.deepcopy(data)
    moved: dict[str, dict[str, Any]] = {"placement": {}, "paths": {}}
    for group, names in (("placement", PLACEMENT_FIELDS), ("paths", HOST_PATH_FIELDS)):
        for dotted in names:
            *sections, leaf = dotted.split(".")
            node = data
            for section in sections:
                node = node.get(section, {})
            if leaf in node:
                moved[group][dotted] = node.pop(leaf)
    return data, moved


def merge_environment(record: dict[str, Any]) -> dict[str, Any]:
    """The full config dict of a config.yaml record (its config plus the placement and paths
    kept under its environment)."""
    import copy

    data = copy.deepcopy(record.get("config", {}))
    environment = record.get("environment") or {}
    for group in ("placement", "paths"):
        for dotted, value in (environment.get(group) or {}).items():
            *sections, leaf = dotted.split(".")
            node = data
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("mix",):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def output_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fields (dotted) that differ and change the output; ``old``/``new`` are flattened."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if k not in FREE_FIELDS and old.get(k) != new.get(k)
    ]


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(
            f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}"
        )
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(where + u for u in unknown)}; "
            f"valid in {where or '<root>'}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}{name}.")
        elif name == "slerp_t":
            kwargs[name] = tuple(float(v) for v in value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = float(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
