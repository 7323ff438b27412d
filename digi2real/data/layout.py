"""Every name under a converted dataset ``OUT/``: the one place that spells them.

::

    OUT/
      images/<identity>/<k:04d>.jpg        aligned 112x112 crops (the ImageFolder root)
      images/metadata.parquet              the images' attributes, typed, for `datasets`
                                           (a run that carries attributes)
      annotations/<identity>/<k:04d>.json     an image's attributes (the same run)
      annotations/<identity>/<k:04d>_seg.png  its render's class-id mask, in its frame
      originals/<identity>/<k:04d>.jpg     full-resolution outputs (output.keep_original)
      wds/shard-NNNNNN.tar                 WebDataset
      rec/{train.rec,train.idx,property}   insightface RecordIO
      manifest.parquet                     one row per accepted image; written LAST
      rejected.parquet  errors.parquet  labels.csv  config.yaml  DATASET_CARD.md  README.md
      report/{report.json,similarity_hist.png,contact_NNN.png,pose.png,index.html,
              judge_outputs.npy,domain_gap.png,domain_gap_features.png,
              features_{gallery,sources,outputs}.npz}
                                           a report (features_*: cached feature summaries)
      report/{attributes.png,landmarks_NNN.png}
                                           its attribute section (a run that carries them)
      report/{compare.json,compare.html}   `report --compare` of several runs (first run's)
      .digi2real/                          run state
        run.json  plan.parquet  plan_errors.parquet
        attributes.parquet                 the planned source images' ground truth (if any)
        outputs.npy  targets.npy           row-aligned with manifest.parquet
        cache/shard-NNNNNN.parquet         a shard's source embeddings
        cache/shard-NNNNNN-estimates.parquet  its source images' *_est attributes
        shards/NNNNNN/{manifest,rejected,errors}.parquet {outputs,targets}.npy
                                           a shard's parts; its manifest.parquet is the commit
        attempts/<run token>/NNNNNN.<k>    Ray: a shard's k-th attempt (removed after the run)

A pruned copy (``digi2real prune``) adds ``prune.json`` (or holds only ``kept_keys.txt``).

These names are also what digi2real owns in an OUT (:func:`is_owned_name`; images only in a
planned identity's folder): :mod:`digi2real.data.ownership` deletes nothing else.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container
from pathlib import Path
from typing import Any

from digi2real.data.store import ObjectPath, location

IMAGES = "images"
ANNOTATIONS = "annotations"  # outside images/: a mask there would be read as a training image
IMAGES_METADATA = "metadata.parquet"  # in images/: the metadata file `datasets` reads
ORIGINALS = "originals"
WEBDATASET = "wds"
RECORDIO = "rec"
RECORDIO_DATA = "train.rec"
RECORDIO_INDEX = "train.idx"
RECORDIO_PROPERTY = "property"
MANIFEST = "manifest.parquet"
REJECTED = "rejected.parquet"
ERRORS = "errors.parquet"
LABELS = "labels.csv"
CONFIG = "config.yaml"
CARD = "DATASET_CARD.md"
HUB_CARD = "README.md"  # the same card with the Hugging Face Hub's YAML metadata on top
REPORT = "report"
REPORT_JSON = "report.json"
REPORT_HISTOGRAM = "similarity_hist.png"
REPORT_HTML = "index.html"
REPORT_JUDGE_OUTPUTS = "judge_outputs.npy"
REPORT_POSE = "pose.png"
REPORT_DOMAIN_GAP = "domain_gap.png"  # in the recognizer's space
REPORT_DOMAIN_GAP_FEATURES = "domain_gap_features.png"  # in the --features encoder's space
REPORT_ATTRIBUTES = "attributes.png"  # sources vs outputs, one panel per numeric attribute
REPORT_COMPARE_JSON = "compare.json"
REPORT_COMPARE_HTML = "compare.html"
KEPT_KEYS = "kept_keys.txt"
PRUNE_JSON = "prune.json"

STATE = ".digi2real"
RUN_JSON = "run.json"
PLAN = "plan.parquet"
PLAN_ERRORS = "plan_errors.parquet"
ATTRIBUTES = "attributes.parquet"
OUTPUTS = "outputs.npy"  # generated images' embeddings, row-aligned with the manifest
TARGETS = "targets.npy"  # their target embeddings, likewise
CACHE = "cache"
SHARDS = "shards"
ATTEMPTS = "attempts"  # the Ray runner's attempt markers, one folder per driver invocation
# a shard's parts, written in this order; the manifest part last is the commit marker
SHARD_PARTS = (ERRORS, REJECTED, OUTPUTS, TARGETS, MANIFEST)


CONTACT_SHEET_GLOB = "contact_*.png"
LANDMARK_SHEET_GLOB = "landmarks_*.png"  # outputs with their carried landmarks drawn

# -- what digi2real writes, by name: the ownership rule (data/ownership.py applies it) -------
# OUT's top-level files; the whole run-state folder; the report's files
OWNED_FILES = frozenset(
    {MANIFEST, REJECTED, ERRORS, LABELS, CONFIG, CARD, HUB_CARD, KEPT_KEYS, PRUNE_JSON}
)
OWNED_FOLDERS = frozenset({IMAGES, ORIGINALS, ANNOTATIONS, WEBDATASET, RECORDIO, REPORT, STATE})
_REPORT_FILE = re.compile(
    r"^(?:report\.json|similarity_hist\.png|pose\.png|index\.html|judge_outputs\.npy"
    r"|domain_gap\.png|domain_gap_features\.png|features_(?:gallery|sources|outputs)\.npz"
    r"|compare\.json|compare\.html|contact_\d{3,}\.png"
    r"|attributes\.png|landmarks_\d{3,}\.png)$"
)
_IMAGE_FILE = re.compile(r"^\d{4,}\.jpg$")
_ANNOTATION_FILE = re.compile(r"^\d{4,}(?:\.json|_seg\.png)$")
_WEBDATASET_FILE = re.compile(r"^shard-\d{6}\.tar$")
_RECORDIO_FILES = frozenset({RECORDIO_DATA, RECORDIO_INDEX, RECORDIO_PROPERTY})


def is_owned_name(relative: str, identities: Container[str]) -> bool:
    """Whether the file at ``relative`` (POSIX, relative to OUT) is one digi2real writes in
    an OUT whose plan holds ``identities`` (NFC names). Images count only in a planned
    identity's folder, so a user's file beside them is never taken for one."""
    parts = relative.split("/")
    top, name = parts[0], parts[-1]
    if len(parts) == 1:
        return top in OWNED_FILES
    if top == STATE:
        return True
    if top in (IMAGES, ORIGINALS, ANNOTATIONS):
        if relative == f"{IMAGES}/{IMAGES_METADATA}":
            return True
        identity = unicodedata.normalize("NFC", parts[1])
        pattern = _ANNOTATION_FILE if top == ANNOTATIONS else _IMAGE_FILE
        return len(parts) == 3 and identity in identities and bool(pattern.match(name))
    if len(parts) != 2:
        return False
    if top == WEBDATASET:
        return bool(_WEBDATASET_FILE.match(name))
    if top == RECORDIO:
        return name in _RECORDIO_FILES
    if top == REPORT:
        return bool(_REPORT_FILE.match(name))
    return False


def is_contact_sheet(name: str) -> bool:
    return name.startswith("contact_") and bool(_REPORT_FILE.match(name))


def contact_sheet_name(number: int) -> str:
    return f"contact_{number:03d}.png"


def is_landmark_sheet(name: str) -> bool:
    return name.startswith("landmarks_") and bool(_REPORT_FILE.match(name))


def landmark_sheet_name(number: int) -> str:
    return f"landmarks_{number:03d}.png"


def feature_summary_name(role: str) -> str:
    """The report's cached summary of one population's features (gallery, sources, outputs)
    in the ``--features`` encoder's space."""
    return f"features_{role}.npz"


def webdataset_shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def image_path(identity: str, index: int, folder: str = IMAGES, suffix: str = ".jpg") -> str:
    """An image's path relative to OUT (POSIX separators, as in the manifest); ``identity``
    must be a usable path component (:func:`digi2real.data.fsio.safe_component`).
    ``suffix``: one of :data:`SIDECARS` (``folder`` :data:`ANNOTATIONS`) names the image's
    sidecar instead."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return f"{folder}/{identity}/{index:04d}{suffix}"


# an image's sidecars in annotations/<identity>/: its attributes and its mask
SIDECAR_JSON = ".json"
SIDECAR_MASK = "_seg.png"
SIDECARS = (SIDECAR_JSON, SIDECAR_MASK)


def sidecar_of(image: str, suffix: str) -> str:
    """The sidecar (:data:`SIDECARS`) of the image at ``image`` (``images/<identity>/<k>.jpg``)."""
    return f"{ANNOTATIONS}/{image.removeprefix(IMAGES + '/').removesuffix('.jpg')}{suffix}"


def image_of(relative: str) -> str:
    """The image a file in an identity folder belongs to: itself, or a sidecar's image."""
    for suffix in SIDECARS:
        if relative.endswith(suffix):
            return relative.removesuffix(suffix) + ".jpg"
    return relative


class OutLayout:
    """The paths of one ``OUT/``: a local folder or a prefix in an object store
    (:func:`digi2real.data.store.location`); the properties are ``Path`` or ``ObjectPath``
    accordingly (typed ``Any``: both answer the same reading methods)."""

    def __init__(self, root: str | Path | ObjectPath) -> None:
        self.root: Any = location(root)

    def __truediv__(self, relative: str) -> Any:
        return self.root / relative

    @property
    def images(self) -> Any:
        return self.root / IMAGES

    @property
    def originals(self) -> Any:
        return self.root / ORIGINALS

    @property
    def manifest(self) -> Any:
        return self.root / MANIFEST

    @property
    def rejected(self) -> Any:
        return self.root / REJECTED

    @property
    def errors(self) -> Any:
        return self.root / ERRORS

    @property
    def labels(self) -> Any:
        return self.root / LABELS

    @property
    def config(self) -> Any:
        return self.root / CONFIG

    @property
    def card(self) -> Any:
        return self.root / CARD

    @property
    def hub_card(self) -> Any:
        return self.root / HUB_CARD

    @property
    def report(self) -> Any:
        return self.root / REPORT

    @property
    def report_json(self) -> Any:
        return self.report / REPORT_JSON

    @property
    def state(self) -> Any:
        return self.root / STATE

    @property
    def run_json(self) -> Any:
        return self.state / RUN_JSON

    @property
    def plan(self) -> Any:
        return self.state / PLAN

    @property
    def plan_errors(self) -> Any:
        return self.state / PLAN_ERRORS

    @property
    def outputs(self) -> Any:
        return self.state / OUTPUTS

    @property
    def targets(self) -> Any:
        return self.state / TARGETS

    def cache(self, shard: int) -> Any:
        return self.state / CACHE / f"shard-{shard:06d}.parquet"

    def estimates_cache(self, shard: int) -> Any:
        return self.state / CACHE / f"shard-{shard:06d}-estimates.parquet"

    @property
    def attributes(self) -> Any:
        return self.state / ATTRIBUTES

    def shard(self, shard: int) -> Any:
        return self.state / SHARDS / f"{shard:06d}"

    def is_committed(self, shard: int) -> bool:
        return (self.shard(shard) / MANIFEST).is_file()

    def committed(self) -> set[int]:
        """Every shard whose commit marker exists, from one listing of the shard parts (on a
        store, a LIST instead of a HEAD per shard)."""
        shards = self.state / SHARDS
        if isinstance(shards, ObjectPath):
            names = list(shards.listing()) if shards.exists() else []
        else:
            names = [p.relative_to(shards).as_posix() for p in shards.glob(f"*/{MANIFEST}")]
        return {
            int(folder)
            for folder, _, name in (n.partition("/") for n in names)
            if name == MANIFEST and folder.isdigit()
        }
