from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from digi2real import weights
from digi2real.cli import main


def test_tiny_profile_has_the_real_layout(tiny_weights):
    root = tiny_weights.root
    # every file of the real profile, optional components included; not a hand-placed stand-in
    package = {
        e["path"] for e in weights.load_package_manifest()["files"] if not e.get("alternative_to")
    }
    present = {f["path"] for f in tiny_weights.files}
    assert package <= present
    for rel in package:
        assert (root / rel).is_file(), rel
    total = sum(f["size"] for f in tiny_weights.files)
    assert total < 20e6
    assert tiny_weights.profile == "tiny"
    # configs carry the same classes as the real ones, with small widths
    unet = json.loads((root / "arc2face/config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"
    assert (
        unet["cross_attention_dim"]
        == json.loads((root / "encoder/config.json").read_text())["hidden_size"]
    )
    assert json.loads((root / "taesd/config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert {g for g in ("lcm", "tcd", "taesd") if tiny_weights.has(g)} == {"lcm", "tcd", "taesd"}


def test_tiny_tokenizer_is_the_real_clip_vocabulary(tiny_weights):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_weights.tokenizer)
    assert tokenizer.encode("id", add_special_tokens=False) == [1014]
    ids = tokenizer("photo of a id person").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and 1014 in ids
    assert len(tokenizer) == 49408


# The tokenizer files built from the packaged vocabulary, byte for byte (the same bytes the
# build gave when the vocabulary still came from open_clip_torch's copy).
TOKENIZER_SHA256 = {
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "special_tokens_map.json": "92e1e31d71a7f63cd75b4dfa1469377bd2cd6b8292cf70b3ff5b7082b0edc1c9",
    "tokenizer_config.json": "a91c559092a7e63e9e7e0afa5d2e4a79c5daa385d16ae9ca495161ce4faf0e73",
    "vocab.json": "18bce047b1b195520f8e4beaabf5dc30835afec04acaf1996652c5413716910c",
}


def test_tiny_tokenizer_files_are_the_pinned_bytes(tiny_weights):
    built = {p.name: weights.sha256_file(p) for p in tiny_weights.tokenizer.iterdir()}
    assert built == TOKENIZER_SHA256


def test_clip_vocabulary_ships_in_the_package_with_its_licence():
    import tomllib
    from fnmatch import fnmatch

    from digi2real.weights import tokenizer

    assert weights.sha256_file(tokenizer.CLIP_BPE) == tokenizer.CLIP_BPE_SHA256
    licence = tokenizer.CLIP_BPE.with_name("bpe_simple_vocab_16e6.LICENSE.txt")
    text = licence.read_text(encoding="utf-8")
    assert "Copyright (c) 2021 OpenAI" in text and "MIT License" in text
    # both files are package data, so a wheel carries them
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["digi2real"]
    package = Path(tokenizer.__file__).parents[1]
    for path in (tokenizer.CLIP_BPE, licence):
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch(rel, pattern) for pattern in patterns), rel


def test_altered_clip_vocabulary_is_refused(tmp_path):
    from digi2real.weights import tokenizer

    altered = tmp_path / tokenizer.CLIP_BPE.name
    altered.write_bytes(tokenizer.CLIP_BPE.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        tokenizer.read_clip_bpe(altered)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        tokenizer.read_clip_bpe(tmp_path / "absent.txt.gz")


def test_verify_ok_then_names_removed_and_altered_files(tiny_weights, tmp_path, capsys):
    copy = tmp_path / "w"
    shutil.copytree(tiny_weights.root, copy)
    assert main(["weights", "verify", "--dir", str(copy)]) == 0
    (copy / "vae" / "config.json").unlink()
    with open(copy / "arcface.onnx", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["weights", "verify", "--dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "missing: vae/config.json" in err
    assert "checksum mismatch: arcface.onnx" in err


def test_verify_without_manifest_says_how_to_fix(tmp_path):
    result = weights.verify(tmp_path)
    assert not result.ok and "weights download" in result.problems[0]


def test_open_weights_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights tiny"):
        weights.open_weights(tmp_path / "nothing")


def test_tiny_build_is_deterministic(tiny_weights, tmp_path):
    again = weights.build_tiny(tmp_path / "again")
    assert again.digest == tiny_weights.digest


def test_tiny_refuses_to_overwrite_without_force(tiny_weights):
    with pytest.raises(FileExistsError):
        weights.build_tiny(tiny_weights.root)


def test_package_manifest_is_complete_and_honest():
    files = weights.load_package_manifest()["files"]
    components = {f["component"] for f in files}
    assert {
        "unet",
        "encoder",
        "recognizer",
        "vae",
        "tokenizer",
        "scheduler",
        "detector",
        "lcm-lora",
        "tcd-lora",
        "taesd",
    } <= components
    paths = {f["path"] for f in files}
    for entry in files:
        assert entry["license"] and "commercial" in entry
        source = entry["source"]
        assert source["type"] in ("huggingface", "url", "manual")
        if source["type"] == "huggingface":
            assert source["repo_id"] and source["filename"] and source["revision"]
        else:
            assert source["url"].startswith("https://") and source["manual"]
        # a stand-in replaces a file of the manifest; an optional file has a --with name
        assert entry.get("alternative_to") in (None, *paths)
        assert entry.get("optional") in (None, "lcm", "tcd", "taesd", "landmarks3d", "genderage")
    # every file a new user needs is fetched by `weights download`: none is manual-only
    required = [f for f in files if not f.get("optional") and not f.get("alternative_to")]
    assert all(f["source"]["type"] in ("huggingface", "url") for f in required)
    # unknown checksums are null (trust on first use), never invented
    assert all(f["sha256"] is None or len(f["sha256"]) == 64 for f in files)


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["weights", "download", "--dir", str(tmp_path / "real")])
    assert code == 1  # a run that failed (README "Exit codes"), not a usage error
    assert "network" in capsys.readouterr().err


def test_pickled_checkpoint_converted_with_weights_only(tmp_path):
    import torch
    from safetensors.torch import load_file

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    weights.convert_bin_to_safetensors(
        tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors"
    )
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a.weight"], state["a.weight"])


def test_pickled_checkpoint_with_code_is_refused(tmp_path):
    import pickle

    import torch

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"x": Evil()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        weights.convert_bin_to_safetensors(tmp_path / "evil.bin", tmp_path / "out.safetensors")
    assert not (tmp_path / "pwned").exists()
    del torch
