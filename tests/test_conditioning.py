from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from helpers import unit_rows

from digi2real.pipeline.conditioning import IdentityEncoder
from digi2real.weights.configs import TINY_ID_DIM


@pytest.fixture(scope="module")
def encoder(tiny_weights):
    return IdentityEncoder.from_weights(tiny_weights, id_dim=TINY_ID_DIM)


def reference_by_embedding_row(encoder: IdentityEncoder, vector: np.ndarray) -> torch.Tensor:
    """Independent mechanism: overwrite the 'id' row of the token-embedding table."""
    model = copy.deepcopy(encoder.text_encoder)
    for hook_dict in (model.get_input_embeddings()._forward_hooks,):
        hook_dict.clear()
    padded = torch.zeros(encoder.hidden_size)
    padded[: len(vector)] = torch.from_numpy(vector)
    with torch.no_grad():
        model.get_input_embeddings().weight[encoder.id_token_id] = padded
        return model(input_ids=encoder.input_ids)[0][0]


def test_injection_matches_embedding_row_replacement(encoder):
    vectors = unit_rows(3, TINY_ID_DIM)
    batch = encoder.encode(vectors)
    assert batch.shape == (3, 77, encoder.hidden_size)
    for i, vector in enumerate(vectors):
        torch.testing.assert_close(
            batch[i], reference_by_embedding_row(encoder, vector), atol=1e-5, rtol=1e-5
        )


def test_batch_of_n_equals_one_at_a_time(encoder):
    vectors = unit_rows(5, TINY_ID_DIM, seed=1)
    batch = encoder.encode(vectors)
    singles = torch.cat([encoder.encode(v[None]) for v in vectors])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_prefix_is_shared_and_identity_changes_the_rest(encoder):
    a, b = encoder.encode(unit_rows(2, TINY_ID_DIM, seed=2))
    pos = int(encoder.id_positions[0])
    # causal encoder: positions before the id token do not see it
    torch.testing.assert_close(a[:pos], b[:pos])
    assert not torch.allclose(a[pos:], b[pos:])


def test_empty_prompt_branch_is_not_injected_nor_shifted(encoder):
    empty_before = encoder.encode_empty().clone()
    encoder.encode(unit_rows(2, TINY_ID_DIM))

    class AddOne:
        def apply(self, cond):
            return cond + 1

    shifted = IdentityEncoder(
        encoder.text_encoder, encoder.tokenizer, id_dim=TINY_ID_DIM, shift=AddOne()
    )
    vectors = unit_rows(2, TINY_ID_DIM, seed=3)
    torch.testing.assert_close(shifted.encode(vectors), encoder.encode(vectors) + 1)
    torch.testing.assert_close(shifted.encode_empty(), empty_before)
    torch.testing.assert_close(encoder.encode_empty(), empty_before)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, TINY_ID_DIM), np.float32), "non-empty"),
        (unit_rows(2, 8), "width 8"),
        (np.full((1, TINY_ID_DIM), np.nan, np.float32), "non-finite"),
        (np.ones((1, TINY_ID_DIM), np.float32), "L2-normalised"),
    ],
)
def test_invalid_embeddings_are_refused(encoder, bad, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode(bad)


def test_identity_wider_than_encoder_is_refused(encoder):
    with pytest.raises(ValueError, match="identity width"):
        IdentityEncoder(encoder.text_encoder, encoder.tokenizer, id_dim=encoder.hidden_size + 1)


def test_runs_on_installed_transformers_major():
    # the hook uses only get_input_embeddings(), public on transformers 4 and 5
    assert int(transformers.__version__.split(".")[0]) in (4, 5)
