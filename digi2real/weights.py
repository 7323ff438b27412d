"""Weights: the manifest of every file a real run needs, download, verify, and the tiny profile.

A weights dir (``DIR``) has the same layout for both profiles::

    DIR/manifest.json                 files actually present, with sha256 (written by download/tiny)
    DIR/face.json                     recognizer/detector preprocessing (data, not code)
    DIR/arc2face/{config.json,diffusion_pytorch_model.safetensors}   UNet2DConditionModel
    DIR/encoder/{config.json,model.safetensors}                      CLIPTextModel (Arc2Face)
    DIR/vae/{config.json,diffusion_pytorch_model.safetensors}        AutoencoderKL
    DIR/tokenizer/{vocab.json,merges.txt,special_tokens_map.json,tokenizer_config.json}
    DIR/scheduler/scheduler_config.json
    DIR/arcface.onnx                  ArcFace recognizer (N,3,112,112) -> (N,D)
    DIR/scrfd_10g_bnkps.onnx          SCRFD detector

Nothing here runs at conversion time except :func:`open_weights` (reads, never fetches).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digi2real.data import fsio

logger = logging.getLogger(__name__)

PACKAGE_MANIFEST = Path(__file__).with_name("weights_manifest.json")
DIR_MANIFEST = "manifest.json"
FACE_CONFIG = "face.json"
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


# ---------------------------------------------------------------------------------------------
# The real profile's configs (public configs of Arc2Face / SD-1.5). Used for the face config a
# download writes and for building the full-size architecture with random weights (benchmarks).
# ---------------------------------------------------------------------------------------------

REAL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

REAL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

REAL_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

REAL_FACE_CONFIG: dict[str, Any] = {
    "recognizer": {
        "file": "arcface.onnx",
        "input_size": 112,
        "color": "RGB",
        "mean": [127.5, 127.5, 127.5],
        "std": [127.5, 127.5, 127.5],
    },
    "detector": {
        "file": "scrfd_10g_bnkps.onnx",
        "kind": "scrfd",
        "input_size": 640,
        "score_threshold": 0.5,
        "nms_threshold": 0.4,
        "pad_ratio": 1.0,
    },
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **REAL_UNET_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "sample_size": 8,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **REAL_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

TINY_ENCODER_CONFIG: dict[str, Any] = {
    **REAL_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

TINY_ID_DIM = 16
TINY_DETECTOR_SIZE = 160

CLIP_TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}

CLIP_SPECIAL_TOKENS: dict[str, Any] = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


# ---------------------------------------------------------------------------------------------
# Reading a weights dir
# ---------------------------------------------------------------------------------------------


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
    rows = sorted((f["path"], f["sha256"]) for f in files)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def open_weights(root: str | Path) -> WeightsDir:
    """Open a weights dir written by ``digi2real weights download`` or ``weights tiny``.

    Reads the manifest only (sizes are checked, checksums are :func:`verify`'s job, which
    hashes gigabytes).
    """
    root = Path(root).expanduser()
    manifest_path = root / DIR_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no weights at {root} ({DIR_MANIFEST} missing): run `digi2real weights download "
            f"--dir {root}` for the real weights or `digi2real weights tiny --dir {root}` for the "
            "tiny test profile"
        )
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("profile") not in PROFILES:
        raise ValueError(f"{manifest_path} is not a digi2real weights manifest (format/profile)")
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


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------


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
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    profile = manifest.get("profile")
    fix = (
        f"rebuild with `digi2real weights tiny --dir {root} --force`"
        if profile == "tiny"
        else f"re-fetch with `digi2real weights download --dir {root}`"
    )
    problems: list[str] = []
    present = set()
    for entry in manifest.get("files", []):
        path = root / entry["path"]
        present.add(entry["path"])
        if not path.is_file():
            problems.append(f"missing: {entry['path']} — {fix}")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(
                f"size mismatch: {entry['path']} is {size} bytes, expected {entry['size']} — {fix}"
            )
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(
                f"checksum mismatch: {entry['path']} has sha256 {actual}, expected {entry['sha256']} — {fix}"
            )
    if profile == "real":
        for entry in load_package_manifest()["files"]:
            if entry["path"] not in present:
                problems.append(f"missing: {entry['path']} (required) — {_how_to_get(entry, root)}")
    return VerifyResult(root, problems, len(present))


def _how_to_get(entry: dict[str, Any], root: Path) -> str:
    source = entry["source"]
    if source["type"] == "huggingface":
        return f"run `digi2real weights download --dir {root}`"
    return source.get("manual", f"download {source.get('url')} into {root}")


# ---------------------------------------------------------------------------------------------
# Writing DIR/manifest.json
# ---------------------------------------------------------------------------------------------


def _entry_for(root: Path, rel: str, meta: dict[str, Any]) -> dict[str, Any]:
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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Download (real profile)
# ---------------------------------------------------------------------------------------------


class NoNetworkError(RuntimeError):
    pass


def download(root: str | Path, *, token: str | None = None) -> VerifyResult:
    """Fetch every Hugging Face file of the package manifest into ``root`` (resumable: files
    already present with a recorded checksum are kept), convert pickled checkpoints to
    safetensors once, write ``face.json`` and ``manifest.json``. URL/manual sources (SCRFD) are
    used when already placed in ``root``, else reported with their instructions."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (root / DIR_MANIFEST).is_file():
        previous = {
            e["path"]: e
            for e in json.loads((root / DIR_MANIFEST).read_text(encoding="utf-8"))["files"]
        }
    entries: list[dict[str, Any]] = []
    manual: list[str] = []
    for meta in load_package_manifest()["files"]:
        rel = meta["path"]
        target = root / rel
        source = meta["source"]
        if target.is_file() and rel in previous and previous[rel]["size"] == target.stat().st_size:
            entries.append(previous[rel])
            continue
        if source["type"] != "huggingface":
            if target.is_file():
                entries.append(_entry_for(root, rel, meta))
            else:
                manual.append(f"{rel}: {source.get('manual', source.get('url'))}")
            continue
        try:
            fetched = Path(
                hf_hub_download(
                    repo_id=source["repo_id"],
                    filename=source["filename"],
                    revision=source.get("revision", "main"),
                    local_dir=root / ".download",
                    token=token,
                )
            )
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise NoNetworkError(
                f"could not fetch {source['repo_id']}/{source['filename']}: {error}. "
                "Downloading weights needs network access to huggingface.co; on an offline "
                "machine, download on another machine and copy the dir, then run "
                "`digi2real weights verify --dir DIR`."
            ) from error
        target.parent.mkdir(parents=True, exist_ok=True)
        source_sha = sha256_file(fetched)
        if source.get("convert") == "torch-bin-to-safetensors":
            convert_bin_to_safetensors(fetched, target)
        else:
            # the download dir is ours and on the same file system: a rename, not a 3 GB copy
            os.replace(fetched, target)
        entry = _entry_for(root, rel, meta)
        entry["source"] = {**source, "sha256_of_source": source_sha}
        if meta.get("sha256") and meta["sha256"] != entry["sha256"]:
            raise ValueError(
                f"{rel}: downloaded sha256 {entry['sha256']} differs from the package "
                f"manifest's {meta['sha256']}"
            )
        entry["trust"] = "pinned" if meta.get("sha256") else "first-use"
        entries.append(entry)
    _write_json(root / FACE_CONFIG, REAL_FACE_CONFIG)
    entries.append(
        _entry_for(
            root,
            FACE_CONFIG,
            {"component": "face-config", "license": "Apache-2.0", "commercial": True},
        )
    )
    shutil.rmtree(root / ".download", ignore_errors=True)
    write_dir_manifest(root, "real", entries)
    for line in manual:
        logger.warning("manual download needed: %s", line)
    return verify(root)


def convert_bin_to_safetensors(source: Path, target: Path) -> None:
    """Load a pickled PyTorch checkpoint with ``weights_only=True`` (no code runs) and store it
    as safetensors."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a flat state dict of tensors")
    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------
# Tiny profile: same layout, classes and configs, random seeded weights, small sizes.
# ---------------------------------------------------------------------------------------------


def clip_bpe_path() -> Path:
    """The CLIP BPE vocabulary open_clip ships, found without importing open_clip (whose
    imports want torchvision/timm)."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            "the tiny profile needs the real CLIP BPE vocabulary that open_clip_torch ships: "
            "`pip install --no-deps open_clip_torch==3.3.0`"
        ) from error
    for file in dist.files or []:
        if file.name == "bpe_simple_vocab_16e6.txt.gz":
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(
        "open_clip_torch is installed but bpe_simple_vocab_16e6.txt.gz is not in it"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (printable bytes map to
    themselves, the rest to code points from 256 up, in byte order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(directory: Path) -> None:
    """vocab.json/merges.txt of the real CLIP tokenizer, built from the BPE merges the way CLIP
    builds its vocabulary (byte tokens, their ``</w>`` forms, merges, then the two specials)."""
    import gzip

    with gzip.open(clip_bpe_path()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_bytes(
        directory / "vocab.json",
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False).encode("utf-8"),
    )
    fsio.atomic_write_bytes(
        directory / "merges.txt",
        ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"),
    )
    _write_json(directory / "tokenizer_config.json", CLIP_TOKENIZER_CONFIG)
    _write_json(directory / "special_tokens_map.json", CLIP_SPECIAL_TOKENS)


def build_tiny(root: str | Path, *, seed: int = 0, force: bool = False) -> WeightsDir:
    """Build the tiny profile in ``root`` (seconds, a few MB)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from digi2real.face.tiny import export_tiny_detector, export_tiny_recognizer

    root = Path(root).expanduser()
    if (root / DIR_MANIFEST).exists() and not force:
        raise FileExistsError(f"{root} already holds weights; pass force=True (--force) to rebuild")
    root.mkdir(parents=True, exist_ok=True)

    def model_config(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**model_config(TINY_UNET_CONFIG))
        vae = AutoencoderKL(**model_config(TINY_VAE_CONFIG))
        encoder_config = {k: v for k, v in TINY_ENCODER_CONFIG.items() if k != "architectures"}
        encoder = CLIPTextModel(CLIPTextConfig(**encoder_config))
    del generator
    for name, model, config in (
        ("arc2face", unet, TINY_UNET_CONFIG),
        ("vae", vae, TINY_VAE_CONFIG),
    ):
        (root / name).mkdir(exist_ok=True)
        _write_json(root / name / "config.json", config)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(root / name / "diffusion_pytorch_model.safetensors"),
        )
    (root / "encoder").mkdir(exist_ok=True)
    _write_json(root / "encoder" / "config.json", TINY_ENCODER_CONFIG)
    # The real Arc2Face checkpoint was saved by transformers 4 ("text_model." prefix); keep
    # that layout so the tiny profile exercises the same loading path.
    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
        for k, v in encoder.state_dict().items()
    }
    save_file(state, str(root / "encoder" / "model.safetensors"), metadata={"format": "pt"})
    write_clip_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json", SD15_SCHEDULER_CONFIG)
    export_tiny_recognizer(root / "arcface.onnx", dim=TINY_ID_DIM, input_size=112, seed=seed)
    export_tiny_detector(root / "scrfd_10g_bnkps.onnx", input_size=TINY_DETECTOR_SIZE, seed=seed)
    face = json.loads(json.dumps(REAL_FACE_CONFIG))
    face["detector"]["input_size"] = TINY_DETECTOR_SIZE
    _write_json(root / FACE_CONFIG, face)

    tiny_license = {
        "license": "Apache-2.0 (random weights, digi2real tiny profile)",
        "commercial": True,
    }
    package = {e["path"]: e for e in load_package_manifest()["files"]}
    entries = []
    for rel, meta in package.items():
        entries.append(
            _entry_for(
                root,
                rel,
                {
                    "component": meta["component"],
                    "source": {"type": "tiny", "seed": seed},
                    "license_url": None,
                    **tiny_license,
                },
            )
        )
    entries.append(
        _entry_for(
            root,
            FACE_CONFIG,
            {"component": "face-config", "source": {"type": "tiny"}, **tiny_license},
        )
    )
    write_dir_manifest(root, "tiny", entries)
    logger.info("tiny weights profile built in %s", root)
    return open_weights(root)


def ensure_tiny(root: str | Path | None = None) -> WeightsDir:
    """Open the tiny profile at ``root`` (default location if None), building it if absent."""
    root = Path(root).expanduser() if root is not None else default_weights_dir("tiny")
    if (root / DIR_MANIFEST).is_file():
        return open_weights(root)
    return build_tiny(root)
