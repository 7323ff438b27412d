"""``digi2real weights download``: the real profile from Hugging Face and the SCRFD detector
from insightface's buffalo_l pack (needs network), optional components when asked."""

from __future__ import annotations

import json
import logging
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from digi2real.data import fsio
from digi2real.weights.configs import REAL_FACE_CONFIG
from digi2real.weights.face_config import FACE_CONFIG
from digi2real.weights.manifest import (
    DIR_MANIFEST,
    VerifyResult,
    check_groups,
    entry_for,
    load_package_manifest,
    read_dir_manifest,
    sha256_file,
    verify,
    write_dir_manifest,
    write_json,
)

logger = logging.getLogger(__name__)


class NoNetworkError(RuntimeError):
    pass


def download(
    root: str | Path, *, token: str | None = None, with_: tuple[str, ...] | list[str] = ()
) -> VerifyResult:
    """Fetch every file of the package manifest a run needs into ``root``, plus the optional
    components named in ``with_`` (lcm, tcd, taesd, landmarks3d, genderage), resumably: files
    already present with a recorded checksum are kept. Pickled checkpoints are converted to
    safetensors once; the SCRFD detector and the optional 3D landmark and gender/age models
    are extracted from insightface's buffalo_l pack, downloaded once for all of them. Writes
    ``face.json`` and ``manifest.json``. A file placed by hand (antelopev2's detector) is
    recorded when present and then stands in for the one it replaces."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(check_groups(list(with_)))
    previous: dict[str, dict[str, Any]] = {}
    if (root / DIR_MANIFEST).is_file():
        try:
            previous = {e["path"]: e for e in read_dir_manifest(root)["files"]}
        except ValueError as error:  # rewritten below: its records are not trusted
            logger.warning("%s; every file is fetched or hashed again", error)
    package = load_package_manifest()["files"]
    # a stand-in placed by hand makes fetching the file it replaces unnecessary
    placed = {
        e["alternative_to"]
        for e in package
        if e.get("alternative_to") and (root / e["path"]).is_file()
    }
    entries: list[dict[str, Any]] = []
    # a pack (buffalo_l.zip) holds several files of the manifest: fetched once per run
    packs: dict[str, tuple[Path, str]] = {}
    for meta in package:
        rel = meta["path"]
        target = root / rel
        source = meta["source"]
        group = meta.get("optional")
        if target.is_file() and rel in previous and previous[rel]["size"] == target.stat().st_size:
            entries.append(previous[rel])
            continue
        if source["type"] == "manual" or rel in placed:
            # placed by hand: recorded now if present; else verify() says how to get it
            if target.is_file():
                entries.append(entry_for(root, rel, meta))
            continue
        if group and group not in wanted:
            if target.is_file():  # fetched earlier, or placed by hand
                entries.append(entry_for(root, rel, meta))
            continue
        member = source.get("member")
        if member and source["url"] in packs:
            fetched, source_sha = packs[source["url"]]
        else:
            fetched = _fetch(source, root / ".download", token)
            source_sha = sha256_file(fetched)
            if member:
                packs[source["url"]] = (fetched, source_sha)
        if source.get("convert") == "torch-bin-to-safetensors":
            convert_bin_to_safetensors(fetched, target)
        elif member:
            _extract(fetched, member, target)
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
    face = json.loads(json.dumps(REAL_FACE_CONFIG))
    detectors = [e["path"] for e in entries if e["component"] == "detector"]
    if detectors and face["detector"]["file"] not in detectors:
        face["detector"]["file"] = detectors[0]  # the stand-in placed by hand
    write_json(root / FACE_CONFIG, face)
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


def _fetch(source: dict[str, Any], folder: Path, token: str | None) -> Path:
    """One source file (a Hugging Face repo file or a URL) into ``folder``."""
    if source["type"] == "huggingface":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(
                hf_hub_download(
                    repo_id=source["repo_id"],
                    filename=source["filename"],
                    revision=source.get("revision", "main"),
                    local_dir=folder,
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
    url = source["url"]
    try:
        return fetch_url(url, folder / url.rsplit("/", 1)[-1])
    except OSError as error:
        raise NoNetworkError(
            f"could not fetch {url}: {error}. Download it on a machine with network access, "
            "extract the file named in `digi2real weights verify --dir DIR` into DIR, then run "
            "`digi2real weights download --dir DIR` again: it records the file."
        ) from error


def fetch_url(url: str, target: Path, *, chunk: int = 1 << 20, timeout: float = 60.0) -> Path:
    """``url`` to ``target``, resuming a partial download (HTTP Range) left by a killed run."""
    partial = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        # 206: the server resumes; 200: it sends the whole file again
        mode = "ab" if offset and response.status == 206 else "wb"
        with open(partial, mode) as handle:
            while block := response.read(chunk):
                handle.write(block)
    fsio.publish(partial, target)
    return target


def _extract(archive: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as pack:
            data = pack.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{archive.name}: cannot extract {member}: {error}") from error
    fsio.atomic_write_bytes(target, data)


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
