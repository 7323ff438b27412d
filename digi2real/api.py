"""The Python API: ``Digi2Real.from_pretrained(...)``, ``.augment(...)``, ``.convert(...)``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import Config, flatten
from digi2real.data.attributes import ESTIMATE_SUFFIX, Balance, bin_index, check_options
from digi2real.data.embeddings import check_embeddings, l2_normalize, load_embeddings
from digi2real.data.expression import parse_expression
from digi2real.data.images import load_image
from digi2real.data.readers import IMAGE_EXTENSIONS, image_files
from digi2real.data.store import location
from digi2real.device import torch_threads
from digi2real.face.align import align_at
from digi2real.face.images import embed_images
from digi2real.pipeline.identity_filter import Pending, generate_with_retries
from digi2real.pipeline.interpolate import plan_identity
from digi2real.version import __version__

logger = logging.getLogger(__name__)

# What random weights cannot honour: their detector finds no face (centre crop instead), their
# recognizer keeps no identity (accept all), and compiling them buys nothing.
TINY_PROFILE_FIELDS = ("filter.threshold", "filter.fallback", "generation.compile")

ImagesOrEmbeddings = str | Path | np.ndarray | Sequence[str | Path | np.ndarray]


@dataclass
class AugmentedImage:
    image: np.ndarray  # aligned 112x112 RGB uint8
    original: np.ndarray  # the generated image at the model's resolution
    metadata: dict[str, Any]


@dataclass
class AugmentResult:
    images: list[AugmentedImage]
    rejected: list[dict[str, Any]]
    source_embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def save(self, out: str | Path) -> Path:
        """``out/NNNN.jpg`` (the aligned crops) and ``out/metadata.json`` (their metadata and
        the rejected targets)."""
        import json

        from digi2real.data import fsio
        from digi2real.data.images import encode_jpeg

        out = Path(out)
        rows = []
        for item in self.images:
            name = f"{item.metadata['index']:04d}.jpg"
            fsio.atomic_write_bytes(out / name, encode_jpeg(item.image))
            rows.append({"file": name, **item.metadata})
        text = json.dumps({"images": rows, "rejected": self.rejected}, indent=2)
        return fsio.atomic_write_bytes(out / "metadata.json", text.encode("utf-8"))


def resolve_config(
    config: Config | str | Path | None = None,
    *,
    preset: str | None = None,
    weights_dir: str | Path | None = None,
) -> Config:
    """The config object, YAML file or preset asked for; with neither, the preset that fits
    the weights dir's profile (``tiny`` for the tiny profile, ``default`` otherwise)."""
    from digi2real.weights import DIR_MANIFEST, default_weights_dir, open_weights

    if isinstance(config, Config):
        return config
    if config is not None:
        return Config.from_yaml(config)
    root = location(weights_dir) if weights_dir is not None else default_weights_dir("real")
    tiny = (root / DIR_MANIFEST).is_file() and open_weights(str(root)).profile == "tiny"
    if preset is None:
        preset = "tiny" if tiny else "default"
    chosen = Config.preset_named(preset)
    if tiny and preset != "tiny":
        # random weights find no face and keep no identity: take the tiny preset's values of
        # the fields that depend on that, so any preset runs end to end on the tiny profile
        tiny_values = flatten(Config.preset_named("tiny").to_dict())
        changed = {f: tiny_values[f] for f in TINY_PROFILE_FIELDS}
        logger.warning(
            "preset %r on the tiny profile (random weights): using the tiny preset's %s",
            preset,
            ", ".join(f"{k}={v!r}" for k, v in changed.items()),
        )
        chosen = chosen.override(changed, where=f"preset {preset} on the tiny profile")
    return chosen


class Digi2Real:
    """One loaded model stack (detector, recognizer, Arc2Face) for conversion and augmentation.

    >>> d2r = Digi2Real.from_pretrained("weights/real", device="cuda")   # doctest: +SKIP
    >>> result = d2r.augment("renders/identity_0001", num_images=8, seed=0)  # doctest: +SKIP
    """

    def __init__(self, engine: Any, config: Config) -> None:
        self.engine = engine
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: str | Path | None = None,
        *,
        device: str | Any | None = None,
        torch_dtype: str | Any | None = None,
        config: Config | str | Path | None = None,
        preset: str | None = None,
        overrides: dict[str, Any] | None = None,
        **dotted: Any,
    ) -> Digi2Real:
        """Load a weights dir (``digi2real weights download`` / ``weights tiny``).

        ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` (default: the
        config's ``run.device``, ``auto``). ``torch_dtype``: ``torch.float16`` or its name
        (``generation.dtype``; CPU runs in float32). ``config``: a Config or a YAML file;
        ``preset`` otherwise (default: ``tiny`` for a tiny-profile dir, ``default`` else).
        ``overrides``: dotted config fields, ``{"generation.steps": 20}``; ``**dotted`` is the
        same as keywords. Every value is validated (a ConfigError names the bad one).
        """
        from digi2real.env import check_environment
        from digi2real.runner.engine import Engine
        from digi2real.weights import default_weights_dir, open_weights

        check_environment()
        root = Path(weights_dir) if weights_dir is not None else default_weights_dir("real")
        weights = open_weights(root)
        values: dict[str, Any] = {"weights": str(root), **(overrides or {}), **dotted}
        if device is not None:
            values["run.device"] = str(device)
        if torch_dtype is not None:
            values["generation.dtype"] = str(torch_dtype).removeprefix("torch.")
        cfg = resolve_config(config, preset=preset, weights_dir=root)
        cfg = cfg.override(values, where="from_pretrained").validate()
        return cls(Engine(cfg, weights, device=cfg.run.device), cfg)

    def to(self, device: str | Any) -> Digi2Real:
        """Move every model to ``device`` (as ``torch.nn.Module.to``; returns self)."""
        self.engine.to(str(device))
        self.config = self.config.override({"run.device": str(device)}, where="to()")
        self.engine.config = self.config
        return self

    @property
    def device(self) -> str:
        return str(self.engine.device)

    # -- augment ---------------------------------------------------------------------------

    def source_embeddings(self, inputs: ImagesOrEmbeddings) -> tuple[np.ndarray, list[str]]:
        """(K, d) unit embeddings and a label for each, from images or embeddings."""
        images = self._images(inputs)
        if images is not None:
            return self._embed_images(images)
        if isinstance(inputs, np.ndarray):
            return self._embeddings_array(inputs, "array")
        return self._embeddings_array(load_embeddings(inputs).embeddings, str(inputs))

    def _images(self, inputs: ImagesOrEmbeddings) -> list[tuple[str, Any]] | None:
        """``(label, path or array)`` of image inputs; None for embeddings."""
        if isinstance(inputs, str | Path):
            path = Path(inputs)
            if path.suffix == ".npy":
                return None
            if not path.is_dir():
                raise FileNotFoundError(f"not a folder of images or a .npy file: {path}")
            files = image_files(path, recursive=False)
            if not files:
                raise ValueError(f"no images in {path} (extensions: {sorted(IMAGE_EXTENSIONS)})")
            items: list[Any] = list(files)
        elif isinstance(inputs, np.ndarray):
            if inputs.ndim == 2:
                return None
            if inputs.ndim not in (3, 4):
                raise ValueError(
                    f"array of shape {inputs.shape}: expected (N, d) embeddings or "
                    "(N, H, W, 3) images"
                )
            items = list(inputs) if inputs.ndim == 4 else [inputs]
        else:
            items = list(inputs)
            if not items:
                raise ValueError("no images or embeddings given")
        return [
            (str(item) if isinstance(item, str | Path) else f"image[{i}]", item)
            for i, item in enumerate(items)
        ]

    def _embeddings_array(self, array: np.ndarray, label: str) -> tuple[np.ndarray, list[str]]:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.engine.id_dim:
            raise ValueError(
                f"embeddings must be (N, {self.engine.id_dim}) for this profile's recognizer, "
                f"got {array.shape}"
            )
        # raw ArcFace outputs (norm ~20) are accepted and normalised, as Arc2Face does
        array = check_embeddings(l2_normalize(array), name="embeddings")
        return array, [f"{label}[{i}]" for i in range(len(array))]

    def _embed_images(self, named: list[tuple[str, Any]]) -> tuple[np.ndarray, list[str]]:
        embeddings, labels = [], []
        for outcome in embed_images(self.engine, named):
            if outcome.embedding is None:
                logger.warning("skipping %s: %s", outcome.name, outcome.reason)
                continue
            embeddings.append(outcome.embedding)
            labels.append(outcome.name)
        if not embeddings:
            raise ValueError("none of the given images has a usable face")
        return np.stack(embeddings), labels

    def augment(
        self,
        images_or_embeddings: ImagesOrEmbeddings,
        *,
        num_images: int = 8,
        seed: int = 0,
        identity: str = "augment",
        init_strength: float | None = None,
        where: str | None = None,
        balance: str | None = None,
        attributes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> AugmentResult:
        """New realistic images of ONE identity from its images (a folder, paths, arrays) or
        its ArcFace embeddings ((N, d) array or .npy), with the conversion's interpolation,
        seeds and identity filter. ``init_strength`` (default: the config's) > 0 starts each
        target from the given image it is closest to (render-guided transfer; images only).

        ``where`` keeps the images whose attributes satisfy it and ``balance`` (``COLUMN[:BINS]``
        or ``COLUMN:E0,E1,...``; bins over these images' values) spreads the outputs over
        bins, as in ``convert``. The attributes are the images' estimates (``yaw_est``...) and
        ``attributes``: ground truth per image, keyed by its path as given (arrays:
        ``image[i]``). Each output's metadata carries its dominant image's attributes."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        check_options(
            self.config.override({"attributes.where": where, "attributes.balance": balance})
        )
        values: dict[str, Any] = {
            "interpolation.outputs_per_identity": num_images,
            "run.seed": seed,
            "generation.init_strength": init_strength,
        }
        cfg = self.config.override(values, where="augment()")
        images = self._images(images_or_embeddings)
        if cfg.generation.init_strength > 0 and images is None:
            raise ValueError(
                "init_strength > 0 starts from the identity's images: pass images, not embeddings"
            )
        embeddings, labels = self.source_embeddings(images_or_embeddings)
        sources = dict(images or [])
        resolution = self.engine.generator.resolution
        values: dict[str, dict[str, Any]] = {}
        bins = None
        if where or balance or attributes:
            if images is None:
                raise ValueError("where, balance and attributes read images: pass images")
            values = self._attribute_values(labels, sources, attributes or {})
            embeddings, labels, bins = _choose(embeddings, labels, values, where, balance)

        def init_image(item: Pending) -> np.ndarray:
            image = sources[item.init_path]
            image = load_image(image) if isinstance(image, str | Path) else np.asarray(image)
            aligned = align_at(image, self.engine.detector, resolution)
            if aligned is None:
                raise ValueError(f"{item.init_path}: no face to start from")
            return aligned

        targets = plan_identity(identity, embeddings, cfg.interpolation, seed, bins)
        pending = [Pending(identity, t, [labels[i] for i in t.sources]) for t in targets]
        with torch_threads(cfg.run.torch_threads):
            accepted, rejected, _ = generate_with_retries(
                self.engine, pending, cfg, init_image=init_image
            )
        settings = self.engine.describe()
        images = [
            AugmentedImage(
                image=a.face.crop,  # type: ignore[arg-type]
                original=a.face.image,
                metadata={
                    "identity": identity,
                    "index": a.item.target.index,
                    "attempt": a.item.attempt,
                    "seed": a.item.seeds[-1],
                    "interp_kind": a.item.target.kind,
                    "source_paths": a.item.source_paths,
                    "interp_weights": list(a.item.target.weights),
                    "similarity": a.similarity,
                    "version": __version__,
                    **settings,
                    "init_strength": cfg.generation.init_strength,
                    "init_path": (a.item.init_path if cfg.generation.init_strength > 0 else None),
                    **(
                        {"attributes_from": a.item.init_path, **values[a.item.init_path]}
                        if values
                        else {}
                    ),
                },
            )
            for a in accepted
        ]
        rejected_rows = [
            {"index": p.target.index, "attempts": p.attempt, "seeds": p.seeds, "reason": p.reason}
            for p in rejected
        ]
        return AugmentResult(images, rejected_rows, embeddings)

    @functools.cached_property
    def _attribute_models(self) -> Any:
        """The optional attribute models the weights dir holds (None: none)."""
        from digi2real.face.attribute_models import AttributeModels

        models = AttributeModels(self.engine.weights, self.engine.device)
        return models if models.available else None

    def _attribute_values(
        self,
        labels: list[str],
        sources: dict[str, Any],
        given: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, dict[str, Any]]:
        """Per usable image: its estimates (``*_est``) and the attributes given for it."""
        from digi2real.face.estimates import estimate_attributes

        values = {}
        for label in labels:
            image = sources[label]
            image = load_image(image) if isinstance(image, str | Path) else np.asarray(image)
            row = dict(estimate_attributes(image, self.engine.detector, self._attribute_models))
            for name, value in (given.get(label) or {}).items():
                if name.endswith(ESTIMATE_SUFFIX) or not str(name).isidentifier():
                    raise ValueError(f"attributes: {name!r} is not a usable attribute name")
                row[name] = value
            values[label] = row
        return values

    # -- convert -----------------------------------------------------------------------------

    def convert(
        self,
        src: str | Path,
        out: str | Path,
        *,
        overwrite: bool = False,
        delete_foreign: bool = False,
        progress: bool = True,
        where: str | None = None,
        balance: str | None = None,
        attributes: str | Path | None = None,
        layout: str | None = None,
        **overrides: Any,
    ) -> Any:
        """Convert a dataset (``src``: one folder per identity, or a FaceSynthetics or
        SynthFace folder) into ``out``; ``overrides`` are dotted config fields. ``overwrite``
        deletes what digi2real wrote in ``out`` first (files it did not write make it refuse,
        unless ``delete_foreign``). ``where``, ``balance``, ``attributes`` (a table) and
        ``layout`` are ``--where``, ``--balance``, ``--attributes`` and ``--layout``."""
        from digi2real.runner.convert import convert

        options = {
            "attributes.where": where,
            "attributes.balance": balance,
            "source.attributes": None if attributes is None else str(attributes),
            "source.layout": layout,
        }
        cfg = self.config.override({"source.root": str(src), **options, **overrides})
        return convert(
            cfg,
            out,
            overwrite=overwrite,
            delete_foreign=delete_foreign,
            progress=progress,
            engine=self.engine,
        )


def _choose(
    embeddings: np.ndarray,
    labels: list[str],
    values: dict[str, dict[str, Any]],
    where: str | None,
    balance: str | None,
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """The images ``where`` keeps, and their ``balance`` bins (None without one)."""
    names = sorted({name for row in values.values() for name in row})

    def column(name: str, rows: list[str]) -> np.ndarray:
        cells = [values[label].get(name) for label in rows]
        if all(c is None or isinstance(c, int | float) and not isinstance(c, bool) for c in cells):
            return np.array([np.nan if c is None else float(c) for c in cells], np.float64)
        return np.array(cells, dtype=object)

    if where:
        expression = parse_expression(where, known=names)
        keep = expression.evaluate({n: column(n, labels) for n in expression.names}, len(labels))
        if not keep.any():
            raise ValueError(f"no image satisfies where={where!r}")
        embeddings = embeddings[keep]
        labels = [label for label, kept in zip(labels, keep.tolist(), strict=True) if kept]
    if not balance:
        return embeddings, labels, None
    spec = Balance.parse(balance)
    if spec.column not in names:
        raise ValueError(f"balance: unknown attribute {spec.column!r}; known: {', '.join(names)}")
    numbers = column(spec.column, labels)
    if numbers.dtype != np.float64:
        raise ValueError(f"balance: attribute {spec.column!r} is not a number")
    return embeddings, labels, bin_index(numbers, spec.resolve(numbers))
