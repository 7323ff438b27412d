from __future__ import annotations

import numpy as np
import pytest
from helpers import unit_rows

from digi2real import Digi2Real
from digi2real.weights.configs import TINY_ID_DIM


@pytest.fixture(scope="module")
def d2r(tiny_weights):
    return Digi2Real.from_pretrained(tiny_weights.root, device="cpu", **{"generation.steps": 3})


def test_augment_from_a_folder_of_one_identity(d2r, sample_dataset):
    result = d2r.augment(sample_dataset / "2", num_images=5, seed=1)
    assert len(result.images) + len(result.rejected) == 5
    assert result.source_embeddings.shape == (4, TINY_ID_DIM)
    for item in result.images:
        assert item.image.shape == (112, 112, 3) and item.image.dtype == np.uint8
        assert item.original.shape == (64, 64, 3)
        meta = item.metadata
        assert meta["steps"] == 3 and meta["interp_kind"] in ("source", "slerp", "dirichlet")
        assert all(p.endswith(".png") for p in meta["source_paths"])
    again = d2r.augment(sample_dataset / "2", num_images=5, seed=1)
    assert all(
        np.array_equal(a.image, b.image) for a, b in zip(result.images, again.images, strict=True)
    )
    other = d2r.augment(sample_dataset / "2", num_images=5, seed=2)
    assert not np.array_equal(result.images[0].image, other.images[0].image)


def test_augment_from_embeddings_array_and_raw_norms(d2r):
    embeddings = unit_rows(3, TINY_ID_DIM) * 20.0  # raw ArcFace outputs have norm ~20: normalised
    result = d2r.augment(embeddings, num_images=4, seed=0)
    assert len(result.images) == 4
    assert np.allclose(np.linalg.norm(result.source_embeddings, axis=1), 1, atol=1e-5)
    assert [m.metadata["index"] for m in result.images] == [0, 1, 2, 3]


def test_augment_from_image_arrays(d2r, sample_dataset):
    from digi2real.data.images import load_image

    images = np.stack([load_image(p) for p in sorted((sample_dataset / "0").glob("*.png"))])
    result = d2r.augment(images, num_images=2, seed=0)
    assert len(result.images) == 2


def test_augment_validates(d2r):
    with pytest.raises(ValueError, match=rf"\(N, {TINY_ID_DIM}\)"):
        d2r.augment(unit_rows(2, 8), num_images=2)
    with pytest.raises(ValueError, match="num_images"):
        d2r.augment(unit_rows(2, TINY_ID_DIM), num_images=0)
    with pytest.raises(FileNotFoundError):
        d2r.augment("/nonexistent/folder")


def test_real_profile_refuses_centre_crop_fallback(tiny_weights, tiny_config, tmp_path):
    import json
    import shutil

    from digi2real.runner.engine import Engine
    from digi2real.weights import open_weights

    copy = tmp_path / "w"
    shutil.copytree(tiny_weights.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["profile"] = "real"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    config = tiny_config(weights=str(copy))
    with pytest.raises(ValueError, match="tiny profile only"):
        Engine(config, open_weights(copy), device="cpu")


def test_convert_from_the_api_reuses_the_loaded_models(d2r, sample_dataset, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def no_second_load(*args, **kwargs):
        raise AssertionError("the API's loaded engine should be reused")

    monkeypatch.setattr("digi2real.runner.engine.Engine.from_config", no_second_load)
    summary = d2r.convert(
        sample_dataset, tmp_path / "out", progress=False, **{"source.identities": "first:1"}
    )
    assert summary.images == pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows > 0
    # a model-side change cannot reuse it: a fresh engine is built (here: refused by the patch)
    with pytest.raises(Exception, match="reused"):
        d2r.convert(sample_dataset, tmp_path / "out2", progress=False, **{"generation.steps": 4})


def test_from_pretrained_as_diffusers_users_expect(tiny_weights, sample_dataset):
    import torch

    from digi2real.config import ConfigError

    d2r = Digi2Real.from_pretrained(
        tiny_weights.root,
        device=torch.device("cpu"),
        torch_dtype=torch.bfloat16,
        overrides={"generation.steps": 2, "filter.max_attempts": 1},
    )
    assert d2r.config.generation.dtype == "bfloat16" and d2r.config.generation.steps == 2
    assert d2r.config.run.device == "cpu" and d2r.device == "cpu"
    assert d2r.engine.dtype == "float32"  # CPU runs in float32 whatever the preset asks
    with pytest.raises(ConfigError, match=r"generation.steps = '2': must be an integer"):
        Digi2Real.from_pretrained(tiny_weights.root, overrides={"generation.steps": "2"})
    with pytest.raises(ConfigError, match="generation.dtype = 'float8'"):
        Digi2Real.from_pretrained(tiny_weights.root, torch_dtype="float8")


def test_to_moves_every_model_and_returns_self(tiny_weights, sample_dataset):
    d2r = Digi2Real.from_pretrained(tiny_weights.root, overrides={"generation.steps": 2})
    before = d2r.augment(sample_dataset / "1", num_images=2, seed=3)
    assert d2r.to("cpu") is d2r
    assert d2r.config.run.device == "cpu"
    for module in (d2r.engine.generator.unet, d2r.engine.generator.vae):
        assert next(module.parameters()).device.type == "cpu"
    assert d2r.engine.embedder.providers == ["CPUExecutionProvider"]
    after = d2r.augment(sample_dataset / "1", num_images=2, seed=3)
    assert all(
        np.array_equal(a.image, b.image) for a, b in zip(before.images, after.images, strict=True)
    )


def test_threads_follow_the_config_and_the_callers_count_comes_back(d2r, sample_dataset):
    import torch

    seen = []
    original = d2r.engine.generate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    torch.set_num_threads(2)
    d2r.engine.generate = spy
    try:
        d2r.augment(sample_dataset / "1", num_images=1, seed=0)
    finally:
        del d2r.engine.generate
    assert seen and set(seen) == {d2r.config.run.torch_threads}
    assert torch.get_num_threads() == 2


def test_augment_with_init_strength_starts_from_the_given_images(d2r, sample_dataset):
    result = d2r.augment(sample_dataset / "2", num_images=3, seed=4, init_strength=0.5)
    assert result.images
    for item in result.images:
        meta = item.metadata
        assert meta["init_strength"] == 0.5 and meta["init_path"] in meta["source_paths"]
    plain = d2r.augment(sample_dataset / "2", num_images=3, seed=4)
    assert all(item.metadata["init_path"] is None for item in plain.images)
    assert not np.array_equal(result.images[0].image, plain.images[0].image)
    with pytest.raises(ValueError, match="pass images, not embeddings"):
        d2r.augment(unit_rows(3, TINY_ID_DIM), num_images=2, init_strength=0.5)
