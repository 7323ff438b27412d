"""`weights download` against a stand-in hub (no network here): the whole flow, offline."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from digi2real import weights
from digi2real.cli import main


@pytest.fixture()
def fake_hub(tiny_weights, tmp_path, monkeypatch):
    """Serves the tiny profile's files under the real repos' file names; counts fetches."""
    served = tmp_path / "hub"
    for entry in weights.load_package_manifest()["files"]:
        source = entry["source"]
        if source["type"] != "huggingface":
            continue
        target = served / source["repo_id"] / source["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if source["filename"] == "encoder/pytorch_model.bin":
            torch.save(load_file(tiny_weights.root / "encoder" / "model.safetensors"), target)
        else:
            shutil.copyfile(tiny_weights.root / entry["path"], target)
    calls = []

    def hf_hub_download(*, repo_id, filename, revision, local_dir, token=None):
        calls.append((repo_id, filename, revision))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(served / repo_id / filename, out)
        return str(out)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_download_converts_records_and_verifies(fake_hub, tiny_weights, tmp_path):
    root = tmp_path / "real"
    result = weights.download(root)
    # SCRFD has no Hugging Face home: reported with its manual instructions
    assert not result.ok
    assert any("scrfd_10g_bnkps.onnx" in p and "antelopev2" in p for p in result.problems)
    shutil.copyfile(tiny_weights.root / "scrfd_10g_bnkps.onnx", root / "scrfd_10g_bnkps.onnx")
    fetched = len(fake_hub)
    result = weights.download(root)  # resumable: fetches nothing already recorded
    assert result.ok, result.problems
    assert len(fake_hub) == fetched
    assert all(rev == "main" for _, _, rev in fake_hub)
    opened = weights.open_weights(root)
    assert opened.profile == "real"
    entries = {e["path"]: e for e in opened.files}
    encoder = entries["encoder/model.safetensors"]
    assert encoder["source"]["sha256_of_source"] and encoder["trust"] == "first-use"
    assert not (root / "encoder" / "pytorch_model.bin").exists()
    state = load_file(root / "encoder" / "model.safetensors")
    assert any(k.startswith("text_model.") for k in state)
    assert (root / "face.json").is_file()
    # the downloaded dir loads with the same classes
    from digi2real.pipeline.conditioning import IdentityEncoder

    assert IdentityEncoder.from_weights(opened, id_dim=16).hidden_size == 64


def test_verify_catches_tampering_after_download(fake_hub, tiny_weights, tmp_path):
    root = tmp_path / "real"
    root.mkdir()
    shutil.copyfile(tiny_weights.root / "scrfd_10g_bnkps.onnx", root / "scrfd_10g_bnkps.onnx")
    assert weights.download(root).ok
    with open(root / "vae" / "diffusion_pytorch_model.safetensors", "ab") as handle:
        handle.write(b"x")
    problems = weights.verify(root).problems
    assert any("vae/diffusion_pytorch_model.safetensors" in p for p in problems)


def test_manual_detector_instructions_work_as_printed(fake_hub, tiny_weights, tmp_path, capsys):
    """SCRFD has no Hugging Face home: download and verify print its URL and the command that
    records it once placed; followed as printed, verify passes."""
    [scrfd] = [
        e for e in weights.load_package_manifest()["files"] if e["source"]["type"] != "huggingface"
    ]
    source = scrfd["source"]
    root = tmp_path / "real"
    assert main(["weights", "download", "--dir", str(root)]) != 0
    [line] = [x for x in capsys.readouterr().err.splitlines() if scrfd["path"] in x]
    assert source["url"] in line and f"to {root / scrfd['path']} " in line
    commands = re.findall(r"`([^`]+)`", line)
    [record] = [c for c in commands if c.startswith("digi2real weights download")]
    assert record == f"digi2real weights download --dir {root}"
    # verify says the same
    assert main(["weights", "verify", "--dir", str(root)]) != 0
    assert line in capsys.readouterr().err.splitlines()

    # follow it: the printed extraction command on a stand-in of the archive, if unzip is here
    archive = tmp_path / "dl" / source["url"].rsplit("/", 1)[-1]
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(tiny_weights.root / scrfd["path"], source["member"])
    [extract] = [c for c in commands if c.startswith("unzip ")]
    if shutil.which("unzip"):
        subprocess.run(shlex.split(extract), cwd=archive.parent, check=True, capture_output=True)
    else:
        shutil.copyfile(tiny_weights.root / scrfd["path"], root / scrfd["path"])
    assert (root / scrfd["path"]).read_bytes() == (tiny_weights.root / scrfd["path"]).read_bytes()
    fetched = len(fake_hub)
    argv = shlex.split(record)
    assert main(argv[1:]) == 0  # the console script `digi2real` is digi2real.cli:main
    assert len(fake_hub) == fetched  # it recorded the placed file and fetched nothing again
    assert main(["weights", "verify", "--dir", str(root)]) == 0
    recorded = {e["path"]: e for e in weights.open_weights(root).files}[scrfd["path"]]
    assert recorded["sha256"] == weights.sha256_file(root / scrfd["path"])
