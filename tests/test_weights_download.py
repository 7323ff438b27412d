"""`weights download` against a stand-in hub (no network here): the whole flow, offline."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from digi2real import weights
from digi2real.cli import main
from digi2real.weights import fetch
from digi2real.weights import manifest as manifest_module

RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7"


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


@pytest.fixture()
def release_server(tiny_weights, tmp_path, monkeypatch):
    """insightface's release page on 127.0.0.1: buffalo_l.zip with the tiny detector as
    det_10g.onnx, at the package manifest's URL rewritten to this server. Counts requests."""
    folder = tmp_path / "release"
    folder.mkdir()
    with zipfile.ZipFile(folder / "buffalo_l.zip", "w") as pack:
        pack.write(tiny_weights.root / "det_10g.onnx", "det_10g.onnx")
        pack.writestr("w600k_r50.onnx", b"not needed by digi2real")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    package = json.loads(json.dumps(weights.load_package_manifest()))
    for entry in package["files"]:
        if "url" in entry["source"]:
            entry["source"]["url"] = entry["source"]["url"].replace(RELEASES, base)
    for module in (fetch, manifest_module):
        monkeypatch.setattr(module, "load_package_manifest", lambda: package)
    yield requests
    server.shutdown()
    server.server_close()


def test_download_converts_records_and_verifies(fake_hub, release_server, tmp_path):
    root = tmp_path / "real"
    result = weights.download(root)
    assert result.ok, result.problems
    # the detector came out of buffalo_l.zip, fetched once
    assert release_server == ["/buffalo_l.zip"]
    fetched = len(fake_hub)
    result = weights.download(root)  # resumable: fetches nothing already recorded
    assert result.ok, result.problems
    assert len(fake_hub) == fetched and release_server == ["/buffalo_l.zip"]
    assert all(rev == "main" for _, _, rev in fake_hub)
    # the optional components are fetched only when asked
    assert not any("lora" in name or "taesd" in repo for repo, name, _ in fake_hub)
    opened = weights.open_weights(root)
    assert opened.profile == "real"
    entries = {e["path"]: e for e in opened.files}
    encoder = entries["encoder/model.safetensors"]
    assert encoder["source"]["sha256_of_source"] and encoder["trust"] == "first-use"
    detector = entries["det_10g.onnx"]
    assert detector["trust"] == "first-use" and detector["source"]["sha256_of_source"]
    assert not (root / "encoder" / "pytorch_model.bin").exists()
    assert not (root / ".download").exists()
    state = load_file(root / "encoder" / "model.safetensors")
    assert any(k.startswith("text_model.") for k in state)
    face = json.loads((root / "face.json").read_text())
    assert face["detector"]["file"] == "det_10g.onnx"
    # the downloaded dir loads with the same classes
    from digi2real.pipeline.conditioning import IdentityEncoder

    assert IdentityEncoder.from_weights(opened, id_dim=16).hidden_size == 64


def test_optional_components_on_request_keep_the_digest(fake_hub, release_server, tmp_path):
    root = tmp_path / "real"
    assert weights.download(root).ok
    digest = weights.open_weights(root).digest
    before = len(fake_hub)
    assert main(["weights", "download", "--dir", str(root), "--with", "lcm,taesd"]) == 0
    names = [name for _, name, _ in fake_hub[before:]]
    assert sorted(names) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    opened = weights.open_weights(root)
    assert opened.has("lcm") and opened.has("taesd") and not opened.has("tcd")
    # fetching an optional component later leaves the dir's digest (and resumable OUTs) alone
    assert opened.digest == digest
    assert opened.lora_file("lcm").is_file()
    with pytest.raises(FileNotFoundError, match="--with tcd"):
        opened.lora_file("tcd")
    assert weights.verify(root).ok
    # tampering with an optional file is caught like any other
    with open(root / "taesd" / "config.json", "a", encoding="utf-8") as handle:
        handle.write(" ")
    assert any("taesd/config.json" in p for p in weights.verify(root).problems)
    assert main(["weights", "download", "--dir", str(root), "--with", "lcm,bogus"]) == 2


def test_antelopev2_detector_placed_by_hand_stands_in(
    fake_hub, release_server, tiny_weights, tmp_path
):
    root = tmp_path / "real"
    root.mkdir()
    shutil.copyfile(tiny_weights.root / "det_10g.onnx", root / "scrfd_10g_bnkps.onnx")
    result = weights.download(root)
    assert result.ok, result.problems
    assert release_server == []  # buffalo_l's detector is not needed
    face = json.loads((root / "face.json").read_text())
    assert face["detector"]["file"] == "scrfd_10g_bnkps.onnx"
    paths = {e["path"] for e in weights.open_weights(root).files}
    assert "scrfd_10g_bnkps.onnx" in paths and "det_10g.onnx" not in paths


def test_verify_catches_tampering_after_download(fake_hub, release_server, tmp_path):
    root = tmp_path / "real"
    assert weights.download(root).ok
    with open(root / "vae" / "diffusion_pytorch_model.safetensors", "ab") as handle:
        handle.write(b"x")
    problems = weights.verify(root).problems
    assert any("vae/diffusion_pytorch_model.safetensors" in p for p in problems)


def test_missing_detector_says_how_to_get_it(fake_hub, release_server, tmp_path, capsys):
    """Without the detector, verify names it, its pack's URL, the stand-in and the command."""
    root = tmp_path / "real"
    assert weights.download(root).ok
    (root / "det_10g.onnx").unlink()
    assert main(["weights", "verify", "--dir", str(root)]) == 1
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "det_10g.onnx" in x and "missing" in x]
    assert "buffalo_l.zip" in line and f"digi2real weights download --dir {root}" in line
    (root / "manifest.json").unlink()
    assert main(["weights", "download", "--dir", str(root)]) == 0
    assert release_server == ["/buffalo_l.zip", "/buffalo_l.zip"]


def test_unreachable_release_is_a_network_error(fake_hub, release_server, tmp_path, monkeypatch):
    package = fetch.load_package_manifest()
    for entry in package["files"]:
        if entry["source"]["type"] == "url":
            entry["source"]["url"] = "http://127.0.0.1:9/buffalo_l.zip"  # discard port: refused
    with pytest.raises(weights.NoNetworkError, match="buffalo_l.zip"):
        weights.download(tmp_path / "real")


def test_fetch_url_resumes_a_partial_download(release_server, tmp_path):
    [entry] = [e for e in fetch.load_package_manifest()["files"] if e["path"] == "det_10g.onnx"]
    url = entry["source"]["url"]
    target = tmp_path / "dl" / "buffalo_l.zip"
    target.parent.mkdir()
    # a killed run left half the file; this server ignores Range (200): rewritten whole
    whole = fetch.fetch_url(url, tmp_path / "whole.zip").read_bytes()
    (target.parent / "buffalo_l.zip.part").write_bytes(whole[: len(whole) // 2])
    assert fetch.fetch_url(url, target).read_bytes() == whole
    assert not (target.parent / "buffalo_l.zip.part").exists()
