"""``digi2real weights download``: the real profile from Hugging Face (needs network)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from digi2real.data import fsio
from digi2real.weights.configs import REAL_FACE_CONFIG
from digi2real.weights.face_config import FACE_CONFIG
from digi2real.weights.manifest import (
    DIR_MANIFEST,
    VerifyResult,
    entry_for,
    load_package_manifest,
    sha256_file,
    verify,
    write_dir_manifest,
    write_json,
)

logger = logging.getLogger(__name__)


class NoNetworkError(RuntimeError):
    pass


def download(root: str | Path, *, token: str | None = None) -> VerifyResult:
    """Fetch every Hugging Face file of the package manifest into ``root`` (resumable: files
    already present with a recorded checksum are kept), convert pickled checkpoints to
    safetensors once, write ``face.json`` and ``manifest.json``. Files without a Hugging Face
    home (SCRFD) are recorded when already placed in ``root``; else the result's problems say
    where to download them and that running this again records them."""
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
    for meta in load_package_manifest()["files"]:
        rel = meta["path"]
        target = root / rel
        source = meta["source"]
        if target.is_file() and rel in previous and previous[rel]["size"] == target.stat().st_size:
            entries.append(previous[rel])
            continue
        if source["type"] != "huggingface":
            # placed by hand: recorded now if present; else verify() says how to get it
            if target.is_file():
                entries.append(entry_for(root, rel, meta))
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
        source_sha = sha256_file(fetched)
        if source.get("convert") == "torch-bin-to-safetensors":
            convert_bin_to_safetensors(fetched, target)
        else:
            # the download dir is ours and on the same file system: a rename, not a 3 GB copy
            fsio.publish(fetched, target)
        entry = entry_for(root, rel, meta)
        entry["source"] = {**source, "sha256_of_source": source_sha}
        if meta.get("sha256") and meta["sha256"] != entry["sha256"]:
            raise ValueError(
                f"{rel}: downloaded sha256 {entry['sha256']} differs from the package "
                f"manifest's {meta['sha256']}"
            )
        entry["trust"] = "pinned" if meta.get("sha256") else "first-use"
        entries.append(entry)
    write_json(root / FACE_CONFIG, REAL_FACE_CONFIG)
    entries.append(
        entry_for(
            root,
            FACE_CONFIG,
            {"component": "face-config", "license": "Apache-2.0", "commercial": True},
        )
    )
    shutil.rmtree(root / ".download", ignore_errors=True)
    write_dir_manifest(root, "real", entries)
    return verify(root)


def convert_bin_to_safetensors(source: Path, target: Path) -> None:
    """Load a pickled PyTorch checkpoint with ``weights_only=True`` (no code runs) and store it
    as safetensors."""
    import torch
    from safetensors.torch import save

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} is not a flat state dict of tensors")
    tensors = {k: v.contiguous() for k, v in state.items()}
    fsio.atomic_write_bytes(target, save(tensors, metadata={"format": "pt"}))
