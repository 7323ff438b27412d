"""What a weights dir holds: the package manifest of every file a real run needs, a dir's
own ``manifest.json`` (the files present, with sha256), opening and verifying a dir.

A weights dir (``DIR``) has the same layout for both profiles::

    DIR/manifest.json                 files actually present, with sha256 (written by download/tiny)
    DIR/face.json                     recognizer/detector preprocessing (data, not code)
    DIR/arc2face/{config.json,diffusion_pytorch_model.safetensors}   UNet2DConditionModel
    DIR/encoder/{config.json,model.safetensors}                      CLIPTextModel (Arc2Face)
    DIR/vae/{config.json,diffusion_pytorch_model.safetensors}        AutoencoderKL
    DIR/tokenizer/{vocab.json,merges.txt,special_tokens_map.json,tokenizer_config.json}
    DIR/scheduler/scheduler_config.json
    DIR/arcface.onnx                  ArcFace recognizer (N,3,112,112) -> (N,D)
    DIR/det_10g.onnx                  SCRFD-10GF detector (buffalo_l; or antelopev2's
                                      scrfd_10g_bnkps.onnx placed by hand: face.json names it)
  optional (``weights download --with lcm,tcd,taesd,landmarks3d,genderage``):
    DIR/lcm-lora/pytorch_lora_weights.safetensors                    LCM-LoRA (sampler lcm)
    DIR/tcd-lora/pytorch_lora_weights.safetensors                    TCD-LoRA (sampler tcd)
    DIR/taesd/{config.json,diffusion_pytorch_model.safetensors}      AutoencoderTiny (decoder tiny)
    DIR/1k3d68.onnx                   68 landmarks in 3D, head pose (buffalo_l; landmarks3d)
    DIR/genderage.onnx                apparent gender and age (buffalo_l; genderage)

A dir's ``digest`` covers the files every run needs, not the optional ones: fetching an optional
component later does not change it (runs that use one record that file's own digest).

Nothing here fetches: :func:`open_weights` reads the dir's manifest only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digi2real.data import fsio
from digi2real.data.store import is_url, location
from digi2real.weights.face_config import FACE_CONFIG

logger = logging.getLogger(__name__)

PACKAGE_MANIFEST = Path(__file__).with_name("manifest.json")
DIR_MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PROFILES = ("real", "tiny")
CHUNK = 1 << 20


def default_weights_dir(profile: str = "real") -> Path:
    """``$DIGI2REAL_HOME/weights/<profile>``, ``$DIGI2REAL_HOME`` defaulting to ~/.cache/digi2real."""
    if profile not in PROFILES:
        raise ValueError(f"unknown weights profile {profile!r}; valid: {', '.join(PROFILES)}")
    home = Path(os.environ.get("DIGI2REAL_HOME", Path.home() / ".cache" / "digi2real"))
    return home / "weights" / profile


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_package_manifest() -> dict[str, Any]:
    with open(PACKAGE_MANIFEST, encoding="utf-8") as handle:
        return json.load(handle)


def optional_groups() -> tuple[str, ...]:
    """The ``--with`` names of the package manifest's optional components."""
    files = load_package_manifest()["files"]
    return tuple(sorted({f["optional"] for f in files if f.get("optional")}))


def is_lora(entry: dict[str, Any]) -> bool:
    return str(entry.get("component", "")).endswith("-lora")


def lora_groups() -> tuple[str, ...]:
    """The optional components that are LoRAs (a config's ``generation.lora`` may name one)."""
    files = load_package_manifest()["files"]
    return tuple(sorted({f["optional"] for f in files if f.get("optional") and is_lora(f)}))


def groups_for(lora: str | None, decoder: str) -> tuple[str, ...]:
    """The optional components a run with this ``generation.lora`` and ``decoder`` uses."""
    groups = [lora] if lora in lora_groups() else []
    if decoder == "tiny":
        groups.append("taesd")
    return tuple(groups)


def parse_groups(text: str) -> tuple[str, ...]:
    """``"lcm,taesd"`` or ``"all"`` -> the optional component names (ValueError naming the
    valid ones otherwise)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return optional_groups() if names == ["all"] else check_groups(names)


def check_groups(groups: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    valid = optional_groups()
    unknown = [g for g in groups if g not in valid]
    if unknown:
        raise ValueError(f"unknown optional weights {unknown}; valid: {', '.join(valid)}, all")
    return tuple(groups)


def is_required(entry: dict[str, Any]) -> bool:
    """Every run needs it (not optional, not a stand-in for another file)."""
    return not entry.get("optional") and not entry.get("alternative_to")


@dataclass(frozen=True)
class WeightsDir:
    """A weights dir that has a ``manifest.json``; paths of its components."""

    root: Path
    profile: str
    files: tuple[dict[str, Any], ...]
    digest: str
    face: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> Path:
        return self.root / "arc2face"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def scheduler(self) -> Path:
        return self.root / "scheduler"

    @property
    def taesd(self) -> Path:
        """TAESD (``AutoencoderTiny``), the tiny decoder; fetched with ``--with taesd``."""
        self.require("taesd")
        return self.root / "taesd"

    def has(self, group: str) -> bool:
        """Whether the optional component ``group`` (lcm, tcd, taesd, landmarks3d, genderage)
        is in this dir."""
        return any(f.get("optional") == group for f in self.files)

    def require(self, group: str) -> None:
        if not self.has(group):
            fix = (
                f"`digi2real weights tiny --dir {_arg(self.root)} --force`"
                if self.profile == "tiny"
                else f"`digi2real weights download --dir {_arg(self.root)} --with {group}`"
            )
            raise FileNotFoundError(f"weights dir {self.root} has no {group!r} component: {fix}")

    def lora_file(self, lora: str) -> Path:
        """A config's ``generation.lora``: a LoRA component's name (lcm, tcd) -> its file in
        this dir; anything else is a path to a LoRA file."""
        if lora not in lora_groups():
            return Path(lora).expanduser()
        self.require(lora)
        [entry] = [f for f in self.files if f.get("optional") == lora and is_lora(f)]
        return self.root / entry["path"]

    def files_for(self, groups: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The files a run uses: everything but the optional components not in ``groups``."""
        return [f for f in self.files if not f.get("optional") or f["optional"] in groups]

    def file_digest(self, component: str) -> str:
        """sha256 over the (path, sha256) pairs of one component's files."""
        rows = sorted((f["path"], f["sha256"]) for f in self.files if f["component"] == component)
        if not rows:
            raise ValueError(f"weights dir {self.root} has no {component!r} files")
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def licenses(self) -> list[dict[str, Any]]:
        return [
            {k: f.get(k) for k in ("path", "component", "license", "license_url", "commercial")}
            for f in self.files
        ]


def _dir_digest(files: list[dict[str, Any]]) -> str:
    rows = sorted((f["path"], f["sha256"]) for f in files if not f.get("optional"))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# what each file entry of a dir's manifest.json holds (other keys: licence, source, trust...)
_ENTRY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "path": str,
    "size": int,
    "sha256": str,
    "component": str,
    "optional": (str, type(None)),
    "alternative_to": (str, type(None)),
}


def read_dir_manifest(root: Path) -> dict[str, Any]:
    """``root/manifest.json``, checked: a mapping of a known format and profile whose
    ``files`` are entries with a relative path inside ``root``, a size and a sha256. A file that
    is not (invalid JSON, a list, a field of the wrong type) is one ValueError naming it."""
    path = root / DIR_MANIFEST
    rewrite = (
        f"`digi2real weights download --dir {_arg(root)}` (or `digi2real weights tiny --dir "
        f"{_arg(root)} --force`) rewrites it"
    )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {rewrite}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must be a JSON object, got {type(manifest).__name__}; {rewrite}")
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("profile") not in PROFILES:
        raise ValueError(f"{path} is not a digi2real weights manifest (format/profile); {rewrite}")
    files = manifest.get("files")
    if not isinstance(manifest.get("digest"), str) or not isinstance(files, list):
        raise ValueError(f"{path}: 'digest' must be text and 'files' a list; {rewrite}")
    for index, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: files[{index}] must be a JSON object; {rewrite}")
        for name, kind in _ENTRY_FIELDS.items():
            value = entry.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(
                    f"{path}: files[{index}].{name} is missing or of the wrong type; {rewrite}"
                )
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(
                f"{path}: files[{index}].path {entry['path']!r:.80} is not a path inside {root}"
            )
    return manifest


def open_weights(root: str | Path) -> WeightsDir:
    """Open a weights dir written by ``digi2real weights download`` or ``weights tiny``.

    Reads the manifest only (sizes are checked, checksums are :func:`verify`'s job, which
    hashes gigabytes). A URL (``s3://bucket/weights``: the user's own copy, for nodes without
    a shared file system) is fetched once per node into its cache, then opened there.
    """
    if is_url(str(root)):
        from digi2real.data.node_cache import local_folder

        root = local_folder(location(str(root)), folder="weights")  # type: ignore[arg-type]
    root = Path(root).expanduser()
    manifest_path = root / DIR_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no weights at {root} ({DIR_MANIFEST} missing): run `digi2real weights download "
            f"--dir {root}` for the real weights or `digi2real weights tiny --dir {root}` for the "
            "tiny test profile"
        )
    manifest = read_dir_manifest(root)
    files = manifest["files"]
    for entry in files:
        path = root / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file missing: {path}; run `digi2real weights verify --dir {root}`"
            )
        if path.stat().st_size != entry["size"]:
            raise ValueError(
                f"weights file {path} has size {path.stat().st_size}, manifest says "
                f"{entry['size']}; run `digi2real weights verify --dir {root}`"
            )
    face_path = root / FACE_CONFIG
    face = json.loads(face_path.read_text(encoding="utf-8")) if face_path.is_file() else {}
    return WeightsDir(root, manifest["profile"], tuple(files), manifest["digest"], face)


@dataclass
class VerifyResult:
    root: Path
    problems: list[str]
    checked: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | Path) -> VerifyResult:
    """Check every file in ``DIR/manifest.json`` (size and sha256) and, for the real profile,
    that every file the package manifest lists is present."""
    root = Path(root).expanduser()
    manifest_path = root / DIR_MANIFEST
    if not manifest_path.is_file():
        return VerifyResult(
            root,
            [
                f"{manifest_path} missing: run `digi2real weights download --dir {root}` "
                f"(or `digi2real weights tiny --dir {root}`)"
            ],
            0,
        )
    manifest = read_dir_manifest(root)
    profile = manifest["profile"]
    package = {e["path"]: e for e in load_package_manifest()["files"]} if profile == "real" else {}

    def fix(rel: str) -> str:
        if profile == "tiny":
            return f"rebuild with `digi2real weights tiny --dir {_arg(root)} --force`"
        if rel in package and package[rel]["source"]["type"] != "huggingface":
            return _how_to_get(package[rel], root)
        return f"re-fetch with `digi2real weights download --dir {_arg(root)}`"

    problems: list[str] = []
    present: set[str] = set()
    for entry in manifest["files"]:
        rel = entry["path"]
        path = root / rel
        present.add(rel)
        if not path.is_file():
            problems.append(f"missing: {rel} — {fix(rel)}")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(
                f"size mismatch: {rel} is {size} bytes, expected {entry['size']} — {fix(rel)}"
            )
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(
                f"checksum mismatch: {rel} has sha256 {actual}, expected {entry['sha256']} — {fix(rel)}"
            )
    stand_ins = {e["alternative_to"]: rel for rel, e in package.items() if e.get("alternative_to")}
    for rel, entry in package.items():
        if not is_required(entry) or rel in present or stand_ins.get(rel) in present:
            continue
        alternative = f" (or {stand_ins[rel]}, placed by hand)" if rel in stand_ins else ""
        problems.append(f"missing: {rel}{alternative} (required) — {_how_to_get(entry, root)}")
    return VerifyResult(root, problems, len(present))


def _arg(path: Path) -> str:
    """``path`` as one shell word, for commands printed to be run as they are."""
    return shlex.quote(str(path))


def _how_to_get(entry: dict[str, Any], root: Path) -> str:
    """The steps that put one package-manifest file into the weights dir ``root`` and record
    it. A file without a Hugging Face home is placed by hand, then recorded by ``weights
    download``, which records files already present in the dir (and fetches the rest)."""
    source = entry["source"]
    record = f"digi2real weights download --dir {_arg(root)}"
    if entry.get("optional"):
        record += f" --with {entry['optional']}"
    if source["type"] == "huggingface":
        return f"run `{record}`"
    url = source["url"]
    target = root / entry["path"]
    member = source.get("member")
    if member:
        archive = url.rsplit("/", 1)[-1]
        place = (
            f"download {url} and extract {member} from it to {target} "
            f"(e.g. `unzip -j {shlex.quote(archive)} {shlex.quote(member)} -d {_arg(root)}`)"
        )
    else:
        place = f"download {url} to {target}"
    note = f" {source['manual']}" if source.get("manual") else ""
    if source["type"] == "url":
        return (
            f"run `{record}` (it fetches {url} and extracts {member or target.name}); without "
            f"network on this machine: {place}, then run `{record}` again: it records the "
            f"file's size and sha256 in {root / DIR_MANIFEST}.{note}"
        )
    return (
        f"{place}, then run `{record}` again: it records the file's size and sha256 in "
        f"{root / DIR_MANIFEST} (and fetches nothing already recorded).{note}"
    )


def entry_for(root: Path, rel: str, meta: dict[str, Any]) -> dict[str, Any]:
    path = root / rel
    return {
        **{k: v for k, v in meta.items() if k not in ("sha256", "size")},
        "path": rel,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }


def write_dir_manifest(root: Path, profile: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    entries = sorted(entries, key=lambda e: e["path"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "profile": profile,
        "digest": _dir_digest(entries),
        "files": entries,
    }
    fsio.atomic_write_bytes(
        root / DIR_MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    return manifest


def write_json(path: Path, data: dict[str, Any]) -> None:
    fsio.atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
