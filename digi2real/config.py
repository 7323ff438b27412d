"""One typed config, validated on load. Presets live in ``configs/*.yaml`` (shipped inside the
package too).

Fields are grouped by stage, one pydantic model per section, so every value is checked where
it enters (a YAML file, a CLI flag, a Python override): type (no silent coercion: ``"3"`` is
not a number, ``"no"`` is not a boolean, a string is not a list), range and choices. A bad
value is a :class:`ConfigError` naming where it came from, the field, the value and what is
allowed. Rules across fields (an ``imagefolder`` in the formats, statistics when the shift is
on) are :meth:`Config.validate`'s. :data:`FREE_FIELDS` may change on an existing output (batch
size, devices, runner...); any other difference is refused because it changes the output.
"""

from __future__ import annotations

import math
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

PRESET_DIR = Path(__file__).with_name("configs")
FORMATS = ("imagefolder", "webdataset", "recordio")
# The one definition: pipeline.domain_shift derives its methods (all but the off switch "none")
# and positions from these.
SHIFT_METHODS = ("none", "mean_shift", "moment_match")
SHIFT_POSITIONS = ("all", "varying")
FALLBACKS = ("none", "center_crop")
RUNNERS = ("local", "ray")
INTERP_KINDS = ("source", "slerp", "dirichlet")
SAMPLERS = ("dpmsolver++", "lcm", "tcd")
# Few-step samplers: the UNet must carry a distilled LoRA (LCM-LoRA, TCD-LoRA) fused at load.
FEW_STEP_SAMPLERS = ("lcm", "tcd")
FEW_STEP_MAX_STEPS = 8
# LCM-LoRA and TCD-LoRA were distilled without (or with weak) classifier-free guidance: their
# model cards use 1.0-2.0; stronger guidance over-saturates.
FEW_STEP_MAX_GUIDANCE = 2.0
DECODERS = ("vae", "tiny")
DTYPES = ("float32", "float16", "bfloat16")
COLORS = ("RGB", "BGR")
# a source tree: one folder per identity (DigiFace-1M, any ImageFolder), or a flat labelled
# set (data/labelled.py); auto decides from the file names
SOURCE_LAYOUTS = ("auto", "folders", "facesynthetics", "synthface")
# the frame the outputs' images and geometric labels are in: the aligned recognition crop, or
# the generation frame (the model's resolution, e.g. 512)
FRAMES = ("crop", "generation")
# landmarks and masks: carried where the source has them and geometry is kept (auto), always
# (carry: refused where they cannot be), or never (off)
GEOMETRY = ("auto", "carry", "off")

# Caps on the counts that allocate or repeat work, far above any sensible run and far below
# what exhausts a machine: a typo (1e12 outputs, a batch of a million) is one line naming the
# field instead of a run that never ends. The bounds that depend on the machine (CPU workers,
# threads, GPU indices) are device.py's.
MAX_OUTPUTS_PER_IDENTITY = 10_000
MAX_ATTEMPTS = 100
MAX_BATCH_SIZE = 4096
MAX_SHARD_SIZE = 100_000  # identities per shard
MAX_SHARD_RETRIES = 100
MAX_DIRICHLET_SOURCES = 1_000
MAX_TORCH_THREADS = 1_024  # per worker; device.check_resources also bounds it by the CPUs

# Strict scalars: an int is a number, but a string, a bool or a NaN is not.
Int = Annotated[int, Strict()]
Positive = Annotated[int, Strict(), Field(ge=1)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a config never needs them, and nested aliases
    expand a kilobyte into gigabytes (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not read", event.start_mark
            )
        return super().compose_node(parent, index)


class _NoAliasDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that writes an object met twice in full, twice: what digi2real
    writes, :func:`read_yaml` (which refuses aliases) and any other reader read back."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any, *, sort_keys: bool = True) -> str:
    """The one YAML writer (config.yaml, the dataset card): safe types, UTF-8 text as is, no
    aliases."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=sort_keys, allow_unicode=True)


def read_yaml(path: Any) -> Any:
    """The YAML document in ``path`` (a local path, or an object-store path with
    ``read_bytes``), safely: no tags, no aliases, UTF-8. A file that is not one is a
    ValueError of one line naming it, the problem and where."""
    if isinstance(path, str):
        path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(error.problem or error.context or "").split())
        raise ValueError(f"{path}: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SourceConfig(Section):
    root: Text | None = None
    identities: Text = "all"  # all | first:N | START:STOP | a,b,c | @file.txt
    min_images: Positive = 1
    license: Text | None = None  # licence of the source dataset, for the dataset card
    layout: Literal[SOURCE_LAYOUTS] = "auto"
    # a table of per-image attributes (CSV, Parquet or JSON Lines keyed by ``path`` relative
    # to the source root) for a source whose layout carries none
    attributes: Text | None = None


class AttributesConfig(Section):
    # keep the source images whose attributes satisfy this condition (data/expression.py)
    where: Text | None = None
    # COLUMN[:BINS] or COLUMN:E0,E1,...: spread each identity's outputs over the bins
    balance: Text | None = None
    # estimate yaw, pitch, roll, face size, sharpness and brightness of every source image
    # (also done for any *_est column --where or --balance names)
    estimate: Flag = False
    geometry: Literal[GEOMETRY] = "auto"


class InterpolationConfig(Section):
    outputs_per_identity: Annotated[int, Strict(), Field(ge=1, le=MAX_OUTPUTS_PER_IDENTITY)] = 20
    # share of each kind among an identity's targets; rounded per identity, deterministic
    mix: dict[Literal[INTERP_KINDS], Annotated[Number, Field(ge=0)]] = Field(
        default_factory=lambda: {"source": 0.2, "slerp": 0.5, "dirichlet": 0.3}
    )
    dirichlet_concentration: Annotated[Number, Field(gt=0)] = 1.0
    dirichlet_sources: Annotated[int, Strict(), Field(ge=2, le=MAX_DIRICHLET_SOURCES)] = (
        3  # embeddings a mixture uses
    )
    # t ~ U(lo, hi) per target
    slerp_t: tuple[Annotated[Number, Field(ge=0, le=1)], Annotated[Number, Field(ge=0, le=1)]] = (
        0.2,
        0.8,
    )

    @field_validator("mix")
    @classmethod
    def _some_share(cls, mix: dict[str, float]) -> dict[str, float]:
        total = sum(mix.values())
        if not math.isfinite(total):
            # each share is finite, but their sum overflows: normalising would give NaN
            raise ValueError("shares are relative weights: their sum must be a finite number")
        if total <= 0:
            raise ValueError("must give some kind a positive share")
        # normalised at load: config.yaml records the shares the run uses (a mix that already
        # sums to 1, as the presets do, is kept as written)
        return mix if total == 1.0 else {kind: share / total for kind, share in mix.items()}

    @field_validator("slerp_t")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError("must be [lo, hi] with lo <= hi")
        return value


class GenerationConfig(Section):
    sampler: Literal[SAMPLERS] = "dpmsolver++"
    steps: Annotated[int, Strict(), Field(ge=1, le=1000)] = 25
    guidance: Annotated[Number, Field(ge=1)] = 3.0
    dtype: Literal[DTYPES] = "float16"
    batch_size: Annotated[int, Strict(), Field(ge=1, le=MAX_BATCH_SIZE)] = (
        16  # targets per UNet call (x2 for guidance); performance only
    )
    channels_last: Flag = True
    compile: Flag = False
    overlap: Flag = True  # post-process batch k on a thread while batch k+1 diffuses
    # render-guided transfer: 0 = text-to-image from noise; s > 0 starts each target from its
    # render, noised to the timestep s selects (diffusers' img2img strength)
    init_strength: Annotated[Number, Field(ge=0, le=1)] = 0.0
    # a LoRA fused into the UNet once at load: a weights-dir component (lcm | tcd, fetched by
    # `weights download --with lcm,tcd`) or a .safetensors file (kohya or diffusers/peft keys)
    lora: Text | None = None
    lora_scale: Annotated[Number, Field(gt=0)] = 1.0
    # vae: SD-1.5's AutoencoderKL; tiny: TAESD (AutoencoderTiny), a fraction of the decode cost
    decoder: Literal[DECODERS] = "vae"


class ShiftConfig(Section):
    method: Literal[SHIFT_METHODS] = "none"
    alpha: Annotated[Number, Field(ge=0)] = 0.0
    positions: Literal[SHIFT_POSITIONS] = "all"
    real_stats: Text | None = None
    synthetic_stats: Text | None = None
    required: Flag = False  # the paper preset: refuse to run without statistics

    @property
    def enabled(self) -> bool:
        """Whether conditioning is shifted at all (alpha = 0 short-circuits)."""
        return self.method != "none" and self.alpha > 0


class FilterConfig(Section):
    # cosine(ArcFace(generated), target). Arc2Face's identity similarity on its own outputs is
    # ~0.5-0.7 with the same ArcFace; 0.4 is well above the impostor distribution of ArcFace
    # R100 (same-person threshold at FAR 1e-4 is ~0.3), so an accepted image is the same
    # identity with margin while most pose/expression variation survives.
    threshold: Annotated[Number, Field(ge=-1, le=1)] = 0.4
    max_attempts: Annotated[int, Strict(), Field(ge=1, le=MAX_ATTEMPTS)] = 3
    fallback: Literal[FALLBACKS] = "none"  # none | center_crop (tiny profile only)


class OutputConfig(Section):
    formats: list[Literal[FORMATS]] = Field(default_factory=lambda: ["imagefolder"])
    shard_size: Annotated[int, Strict(), Field(ge=1, le=MAX_SHARD_SIZE)] = (
        64  # identities per shard
    )
    jpeg_quality: Annotated[int, Strict(), Field(ge=1, le=100)] = 95
    # also keep the generated image at the model's resolution (512x512 with real weights) as
    # originals/<identity>/<k>.jpg beside the aligned 112x112 training crop
    keep_original: Flag = False
    frame: Literal[FRAMES] = "crop"


class ReportConfig(Section):
    # A stricter judge for `digi2real report` than the generation's recognizer: an ONNX
    # ArcFace-style model (N,3,S,S) -> (N,D) and its preprocessing (same fields as face.json's
    # recognizer section). None: the report uses the embeddings stored by the run.
    recognizer: Text | None = None
    input_size: Positive = 112
    color: Literal[COLORS] = "RGB"
    mean: Annotated[list[Number], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [127.5, 127.5, 127.5]
    )
    std: Annotated[list[Annotated[Number, Field(gt=0)]], Field(min_length=3, max_length=3)] = Field(
        default_factory=lambda: [127.5, 127.5, 127.5]
    )


class RunConfig(Section):
    seed: Annotated[int, Strict(), Field(ge=0)] = 0
    device: Text = "auto"  # auto | cpu | cuda | cuda:N
    devices: Text | None = None  # local multi-GPU: "0,1" or "all"
    runner: Literal[RUNNERS] = "local"
    ray_address: Text | None = None
    torch_threads: Annotated[int, Strict(), Field(ge=1, le=MAX_TORCH_THREADS)] = (
        1  # per worker, fixed for CPU determinism
    )
    max_shard_retries: Annotated[int, Strict(), Field(ge=0, le=MAX_SHARD_RETRIES)] = 2
    # the same command on N nodes: this one runs the shards whose index % num_nodes ==
    # node_rank; None: from SLURM_NTASKS/SLURM_PROCID, else WORLD_SIZE/RANK, else 1 and 0
    num_nodes: Positive | None = None
    node_rank: Annotated[int, Strict(), Field(ge=0)] | None = None


class ConfigError(ValueError):
    """Invalid config values: each problem names where it came from (a file, a flag, an
    override), the field, the value and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} invalid config values:"
        lines = [] if len(problems) == 1 else [f"  {p}" for p in problems]
        super().__init__("\n".join([head, *lines]))


def _allowed(error: dict[str, Any]) -> str:
    """What a pydantic error allows, in the words of a config file."""
    kind, context = error["type"], error.get("ctx") or {}
    words = {
        "float_type": "must be a number",
        "int_type": "must be an integer",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "list_type": "must be a list (YAML: [a, b])",
        "dict_type": "must be a mapping",
        "tuple_type": "must be a list of two numbers",
        "finite_number": "must be a finite number",
        "model_type": "must be a mapping of fields",
    }
    if kind in words:
        return words[kind]
    if kind == "literal_error":
        return f"must be one of: {context.get('expected', '')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<="}.get(
            kind, "<"
        )
        bound = next(iter(context.values()), "")
        return f"must be {sign} {bound}"
    if kind in ("too_short", "too_long"):
        return f"must have {context.get('min_length', context.get('max_length'))} items"
    return str(error["msg"]).removeprefix("Value error, ")


# how an error line shows a value: the first items and characters only (a value may be huge)
_SHOWN = reprlib.Repr()  # Python 3.11 takes no keywords here
_SHOWN.maxlevel, _SHOWN.maxdict, _SHOWN.maxlist, _SHOWN.maxtuple = 3, 4, 4, 4
_SHOWN.maxstring = _SHOWN.maxother = 60


def _shown(value: Any, limit: int = 100) -> str:
    """A value as an error line shows it: a bounded repr on one line."""
    text = " ".join(_SHOWN.repr(value).split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _problems(error: ValidationError, where: str, labels: dict[str, str]) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        # the field is section.name (or a top-level name); deeper parts are list indexes or
        # mapping keys inside its value
        field = ".".join(loc[:2]) if loc[0] in SECTIONS and len(loc) > 1 else loc[0]
        if item["type"] == "extra_forbidden":
            section = ".".join(loc[:-1])
            model = _section_model(section)
            valid = ", ".join(sorted(model.model_fields)) if model else ""
            problems.append(
                f"{where}: unknown config field {field!r}; valid in {section or '<root>'}: {valid}"
            )
            continue
        label = labels.get(field, where)
        problems.append(f"{label}: {field} = {_shown(item['input'])}: {_allowed(item)}")
    return problems


class Config(Section):
    weights: Text | None = None
    preset: Text = "default"
    source: SourceConfig = Field(default_factory=SourceConfig)
    attributes: AttributesConfig = Field(default_factory=AttributesConfig)
    interpolation: InterpolationConfig = Field(default_factory=InterpolationConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, where: str = "config", labels: dict[str, str] | None = None
    ) -> Config:
        """Validate ``data``; ``where`` names its origin in errors, ``labels`` a better name
        for single fields (e.g. the CLI flag that set it)."""
        if not isinstance(data, dict):
            raise ConfigError(
                [f"{where}: must be a mapping of sections, got {type(data).__name__}"]
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(_problems(error, where, labels or {})) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = read_yaml(path) or {}
        except ValueError as error:
            raise ConfigError([str(error)]) from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def preset_named(cls, name: str) -> Config:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            valid = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError([f"unknown preset {name!r}; valid: {', '.join(valid)}"])
        return cls.from_yaml(path)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump()
        data["interpolation"]["slerp_t"] = list(data["interpolation"]["slerp_t"])
        return data

    def override(
        self,
        dotted: dict[str, Any],
        *,
        where: str = "override",
        labels: dict[str, str] | None = None,
    ) -> Config:
        """A copy with ``{"generation.steps": 20, ...}`` applied (None values ignored);
        ``labels`` maps a dotted field to the name its value came in under (a CLI flag)."""
        data = self.to_dict()
        for key, value in dotted.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError([f"{where}: unknown config field {key!r}"])
                node = node[part]
            if leaf not in node:
                model = _section_model(".".join(parents))
                valid = ", ".join(sorted(model.model_fields)) if model else ""
                raise ConfigError(
                    [
                        f"{where}: unknown config field {key!r}; valid in {'.'.join(parents) or '<root>'}: {valid}"
                    ]
                )
            node[leaf] = value
        return Config.from_dict(data, where=where, labels=labels)

    # -- rules across fields -----------------------------------------------------------------

    def validate(self) -> Config:
        formats = self.output.formats
        if "imagefolder" not in formats:
            raise ConfigError(
                [
                    "output.formats must include 'imagefolder': the per-shard image store the "
                    f"other formats are assembled from (got {formats})"
                ]
            )
        if len(set(formats)) != len(formats):
            raise ConfigError([f"output.formats has duplicates: {formats}"])
        problems = self._generation_problems()
        if problems:
            raise ConfigError(problems)
        problems = self._attribute_problems()
        if problems:
            raise ConfigError(problems)
        if self.shift.enabled:
            missing = [
                name
                for name in ("real_stats", "synthetic_stats")
                if getattr(self.shift, name) is None
            ]
            if missing:
                raise ConfigError(
                    [
                        f"shift.method={self.shift.method} needs "
                        f"{' and '.join('shift.' + m for m in missing)}: compute them with "
                        "`digi2real stats real SRC --out real.stats` and `digi2real stats "
                        "synthetic SRC --out synth.stats` (see docs/domain-shift.md)"
                    ]
                )
        if self.shift.required and not self.shift.enabled:
            raise ConfigError(
                [
                    f"preset {self.preset!r} requires the domain shift (shift.required): set "
                    "shift.real_stats and shift.synthetic_stats (compute them with `digi2real "
                    "stats real SRC --out real.stats` / `digi2real stats synthetic SRC --out "
                    "synth.stats`, see docs/domain-shift.md), or pass --no-shift to run without it"
                ]
            )
        return self

    def _attribute_problems(self) -> list[str]:
        """Geometric labels need the render's geometry kept."""
        if self.attributes.geometry == "carry" and self.generation.init_strength <= 0:
            return [
                "attributes.geometry = 'carry' needs generation.init_strength > 0: from noise "
                "(strength 0) the output keeps no geometry of its render, so landmarks and "
                "masks carried onto it would be false; set --init-strength (e.g. 0.6)"
            ]
        return []

    def _generation_problems(self) -> list[str]:
        """Sampler, steps, guidance and LoRA must fit together."""
        gen = self.generation
        if gen.sampler not in FEW_STEP_SAMPLERS:
            if gen.lora in FEW_STEP_SAMPLERS:
                return [
                    f"generation.lora = {gen.lora!r} is a few-step distillation: use it with "
                    f"generation.sampler = {gen.lora!r} (steps 1-{FEW_STEP_MAX_STEPS}), not "
                    f"{gen.sampler!r}"
                ]
            return []
        problems = []
        if gen.lora is None:
            problems.append(
                f"generation.sampler = {gen.sampler!r} needs its distilled LoRA: set "
                f"generation.lora = {gen.sampler!r} (fetch it with `digi2real weights download "
                f"--with {gen.sampler}`) or a LoRA file, or use the preset fast4"
            )
        elif gen.lora in FEW_STEP_SAMPLERS and gen.lora != gen.sampler:
            problems.append(
                f"generation.lora = {gen.lora!r} was distilled for sampler {gen.lora!r}, not "
                f"generation.sampler = {gen.sampler!r}"
            )
        if gen.steps > FEW_STEP_MAX_STEPS:
            problems.append(
                f"generation.steps = {gen.steps}: sampler {gen.sampler!r} takes 1-"
                f"{FEW_STEP_MAX_STEPS} steps (more steps need sampler 'dpmsolver++')"
            )
        if gen.guidance > FEW_STEP_MAX_GUIDANCE:
            problems.append(
                f"generation.guidance = {gen.guidance}: sampler {gen.sampler!r} takes guidance "
                f"1.0-{FEW_STEP_MAX_GUIDANCE} (1.0 runs the UNet once per step, no guidance batch)"
            )
        return problems


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in Config.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
}


def _section_model(section: str) -> type[Section] | None:
    return Config if section == "" else SECTIONS.get(section)


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
    "run.num_nodes",
    "run.node_rank",
)

# Fields that may change on an existing output: placement (float rounding of batched kernels
# aside, no output byte depends on it), paths whose content is checked by digest instead
# (weights, stats), and what only the report or the card reads.
FREE_FIELDS = frozenset(PLACEMENT_FIELDS) | {
    "weights",
    "preset",
    "source.root",
    "source.license",
    "source.attributes",  # read once into the persisted plan: a resume never reads it again
    "shift.real_stats",
    "shift.synthetic_stats",
    "shift.required",
    "generation.lora",
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
    "generation.lora",
    "shift.real_stats",
    "shift.synthetic_stats",
    "report.recognizer",
    "source.attributes",
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
    """Fields (dotted) that differ and change the output; ``old``/``new`` are flattened. A
    field that ``old`` predates (an OUT made by an earlier version) is no difference while
    ``new`` keeps its default, which is what the earlier version did."""
    defaults = flatten(Config().to_dict())
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if k not in FREE_FIELDS
        and old.get(k) != new.get(k)
        and not (k not in old and k in defaults and new.get(k) == defaults[k])
    ]
