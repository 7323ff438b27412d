"""Render-guided transfer (generation.init_strength): each target starts from its render,
VAE-encoded and noised to the timestep the strength selects (diffusers' img2img)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import unit_rows
from PIL import Image

from digi2real.data.layout import OutLayout
from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings
from digi2real.pipeline.interpolate import Target, init_source
from digi2real.runner.convert import convert
from digi2real.weights.configs import TINY_ID_DIM

STEPS = 20


@pytest.fixture(scope="module")
def generator(tiny_weights):
    torch.manual_seed(0)
    return Arc2FaceGenerator.from_weights(
        tiny_weights, id_dim=TINY_ID_DIM, settings=SamplerSettings(steps=STEPS)
    )


@pytest.fixture(scope="module")
def renders(generator, sample_dataset) -> np.ndarray:
    size = generator.resolution
    images = []
    for name in ("0/0.png", "3/1.png"):
        with Image.open(sample_dataset / name) as image:
            images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
    return np.stack(images)


def test_strength_zero_is_the_text_to_image_path_bit_for_bit(generator, monkeypatch):
    ids = unit_rows(2, TINY_ID_DIM, seed=4)
    plain = generator(ids, seeds=[5, 6]).images

    def no_vae_encoding(*args, **kwargs):
        raise AssertionError("strength 0 must not encode any image")

    monkeypatch.setattr(generator, "encode_images", no_vae_encoding)
    assert np.array_equal(generator(ids, seeds=[5, 6], image=None, strength=0.0).images, plain)


def test_distance_from_the_vae_round_trip_grows_with_strength(generator, renders):
    """Bound: below one denoising step (strength < 1/steps) the output IS the VAE round trip
    of the init (difference 0). Above it the tiny profile's random UNet moves the image, the
    more the higher the strength, up to the text-to-image distance at strength 1 (the tiny
    VAE's latents are ~0.05 in scale, so even one noise step dominates them: a small strength
    stays close to the init only with real weights, which this machine does not have)."""
    ids = unit_rows(2, TINY_ID_DIM, seed=1)
    with torch.no_grad():
        round_trip = generator.decode(generator.encode_images(renders)).astype(int)

    def distance(images: np.ndarray) -> float:
        return float(np.abs(images.astype(int) - round_trip).mean())

    below_one_step = generator(ids, seeds=[1, 2], image=renders, strength=0.5 / STEPS)
    assert distance(below_one_step.images) == 0.0
    strengths = [1 / STEPS, 0.25, 0.5, 0.75, 1.0]
    distances = [
        distance(generator(ids, seeds=[1, 2], image=renders, strength=s).images) for s in strengths
    ]
    assert distances == sorted(distances) and distances[0] > 0
    text_to_image = distance(generator(ids, seeds=[1, 2]).images)
    assert distances[-1] == pytest.approx(text_to_image, rel=0.02)
    assert distances[0] < 0.95 * text_to_image


def test_invalid_init_inputs(generator, renders):
    ids = unit_rows(2, TINY_ID_DIM, seed=1)
    with pytest.raises(ValueError, match="strength must be in"):
        generator(ids, seeds=[1, 2], image=renders, strength=1.5)
    with pytest.raises(ValueError, match="together with a strength"):
        generator(ids, seeds=[1, 2], image=renders, strength=0.0)
    with pytest.raises(ValueError, match="init images must have shape"):
        generator(ids, seeds=[1, 2], image=renders[:, :32], strength=0.5)


def test_which_render_initialises_a_target():
    embedding = np.ones(4, np.float32) / 2
    assert init_source(Target(0, "source", (7,), (1.0,), embedding)) == 0
    assert init_source(Target(1, "slerp", (3, 5), (0.3, 0.7), embedding)) == 1
    assert init_source(Target(2, "slerp", (3, 5), (0.5, 0.5), embedding)) == 0  # tie: first
    assert init_source(Target(3, "dirichlet", (0, 2, 4), (0.2, 0.5, 0.3), embedding)) == 1


# -- through a conversion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guided(tiny_config, tmp_path_factory):
    def run(name: str, **overrides) -> OutLayout:
        out = tmp_path_factory.mktemp("init") / name
        config = tiny_config(
            **{
                "source.identities": "first:2",
                "generation.steps": 4,
                "generation.init_strength": 0.5,
                "interpolation.outputs_per_identity": 3,
                **overrides,
            }
        )
        convert(config, out, progress=False)
        return OutLayout(out)

    return run


def test_manifest_records_the_init_render_and_strength(guided):
    paths = guided("records")
    rows = pq.read_table(paths.manifest).to_pylist()
    assert rows and all(r["init_strength"] == 0.5 for r in rows)
    for row in rows:
        weights = row["interp_weights"]
        expected = row["source_paths"][max(range(len(weights)), key=lambda i: (weights[i], -i))]
        assert row["init_path"] == expected
    record = paths.config.read_text()
    assert "init_strength: 0.5" in record


def test_changing_the_strength_on_an_existing_out_is_refused(guided, tiny_config):
    from digi2real.runner.plan import ConfigMismatchError

    paths = guided("refuse")
    config = tiny_config(
        **{
            "source.identities": "first:2",
            "generation.steps": 4,
            "generation.init_strength": 0.25,
            "interpolation.outputs_per_identity": 3,
        }
    )
    with pytest.raises(ConfigMismatchError, match="generation.init_strength"):
        convert(config, paths.root, progress=False)


def _images(paths: OutLayout) -> dict[str, np.ndarray]:
    rows = pq.read_table(paths.manifest).to_pylist()
    return {r["path"]: np.asarray(Image.open(paths.root / r["path"]), dtype=int) for r in rows}


def test_batch_size_and_workers_do_not_change_the_guided_images(guided):
    one = guided("batch1", **{"generation.batch_size": 1})
    four = guided("batch4", **{"generation.batch_size": 4})
    workers = guided("workers", **{"generation.batch_size": 1, "run.devices": "cpux2"})
    base = _images(one)
    # workers run the same batches: the same bytes
    assert {p: (one.root / p).read_bytes() for p in base} == {
        p: (workers.root / p).read_bytes() for p in base
    }
    # another batch size: the same images up to float rounding of batched kernels (as the
    # text-to-image path; a lossy JPEG can turn 1 level into a few, hence a mean bound)
    other = _images(four)
    assert base.keys() == other.keys()
    assert max(np.abs(base[p] - other[p]).mean() for p in base) < 0.5
