from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import unit_rows

from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings
from digi2real.weights.configs import TINY_ID_DIM

FAST = SamplerSettings(steps=4, guidance=3.0)


@pytest.fixture(scope="module")
def generator(tiny_weights):
    torch.set_num_threads(1)
    return Arc2FaceGenerator.from_weights(tiny_weights, id_dim=TINY_ID_DIM, settings=FAST)


def test_shapes_and_resolution_from_configs(generator):
    assert generator.resolution == 64  # tiny: 8x8 latents, VAE factor 8
    out = generator(unit_rows(2, TINY_ID_DIM), seeds=[1, 2])
    assert out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.uint8
    assert out.seeds == [1, 2] and out.describe()["steps"] == 4


def test_same_seed_same_image_and_batch_independence(generator):
    ids = unit_rows(4, TINY_ID_DIM, seed=5)
    seeds = [11, 12, 13, 14]
    batch = generator(ids, seeds=seeds).images
    again = generator(ids, seeds=seeds).images
    assert np.array_equal(batch, again)
    for i in range(4):
        single = generator(ids[i : i + 1], seeds=[seeds[i]]).images[0]
        assert np.abs(single.astype(int) - batch[i].astype(int)).max() <= 2


def test_different_seeds_or_identities_differ(generator):
    ids = unit_rows(1, TINY_ID_DIM)
    a = generator(ids, seeds=[1]).images[0]
    b = generator(ids, seeds=[2]).images[0]
    c = generator(unit_rows(1, TINY_ID_DIM, seed=9), seeds=[1]).images[0]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_precomputed_cond_latents_and_generators_match(generator):
    ids = unit_rows(2, TINY_ID_DIM, seed=7)
    ref = generator(ids, seeds=[3, 4]).images
    cond = generator.encode(ids)
    assert np.array_equal(generator(cond=cond, seeds=[3, 4]).images, ref)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    assert np.array_equal(generator(ids, generators=gens).images, ref)
    latents = generator.prepare_latents(seeds=[3, 4])
    assert np.array_equal(generator(ids, latents=latents).images, ref)


def test_guidance_changes_the_output(generator):
    ids = unit_rows(1, TINY_ID_DIM)
    a = generator(ids, seeds=[1]).images
    b = generator(ids, seeds=[1], settings=SamplerSettings(steps=4, guidance=1.0)).images
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": [1]}, "exactly one of id_embeds or cond"),
        ({"id_embeds": unit_rows(2, TINY_ID_DIM), "seeds": [1]}, "seeds has 1 entries"),
        ({"id_embeds": unit_rows(1, TINY_ID_DIM)}, "exactly one of seeds"),
        (
            {
                "id_embeds": unit_rows(1, TINY_ID_DIM),
                "seeds": [1],
                "latents": torch.zeros(1, 4, 8, 8),
            },
            "exactly one of seeds",
        ),
        ({"cond": torch.zeros(1, 5, 5), "seeds": [1]}, "cond must have shape"),
        (
            {"id_embeds": unit_rows(1, TINY_ID_DIM), "latents": torch.zeros(1, 4, 4, 4)},
            "latents must have shape",
        ),
    ],
)
def test_invalid_inputs(generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator(**kwargs)


def test_sampler_settings_validate():
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSettings(sampler="ddim")
    with pytest.raises(ValueError, match="guidance"):
        SamplerSettings(guidance=float("nan"))
