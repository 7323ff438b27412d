"""The domain shift on the tiny profile's real encoder, through the CLI and the conversion."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from digi2real.cli import main
from digi2real.data.embeddings import save_embeddings
from digi2real.pipeline.conditioning import IdentityEncoder
from digi2real.pipeline.domain_shift import (
    DomainShift,
    compute_stats,
    embedding_batches,
    load_stats,
)
from digi2real.weights.configs import TINY_ID_DIM


def population(center_seed: int, n: int, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(center_seed)
    center = rng.normal(size=TINY_ID_DIM)
    center /= np.linalg.norm(center)
    x = center + spread * rng.normal(size=(n, TINY_ID_DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder(tiny_weights):
    return IdentityEncoder.from_weights(tiny_weights, id_dim=TINY_ID_DIM)


@pytest.fixture(scope="module")
def stats_pair(encoder):
    torch.set_num_threads(1)
    real = compute_stats(
        embedding_batches(population(1, 300), 64),
        encoder.encode,
        kind="real",
        encoder_digest=encoder.digest,
        source="A",
    )
    synth = compute_stats(
        embedding_batches(population(2, 300), 64),
        encoder.encode,
        kind="synthetic",
        encoder_digest=encoder.digest,
        source="B",
    )
    return real, synth


def corrected_population_stats(encoder, shift, embeddings):
    cond = torch.cat(
        [shift.apply(encoder.encode(b)).double() for b in embedding_batches(embeddings, 64)]
    )
    return cond.mean(0).numpy(), cond.var(0, unbiased=False).numpy()


def test_mean_shift_moves_the_synthetic_mean_onto_the_real_mean(encoder, stats_pair):
    real, synth = stats_pair
    shift = DomainShift("mean_shift", 1.0, "all", real, synth)
    mean, _ = corrected_population_stats(encoder, shift, population(2, 300))
    assert np.abs(mean - real.mean).max() < 1e-4
    before = np.abs(synth.mean - real.mean).max()
    assert before > 100 * np.abs(mean - real.mean).max()


def test_moment_match_matches_mean_and_variance(encoder, stats_pair):
    real, synth = stats_pair
    shift = DomainShift("moment_match", 1.0, "all", real, synth)
    mean, var = corrected_population_stats(encoder, shift, population(2, 300))
    assert np.abs(mean - real.mean).max() < 1e-4
    varying = real.variance > 1e-8
    rel = np.abs(var[varying] - real.variance[varying]) / real.variance[varying]
    assert rel.max() < 1e-3


def test_alpha_zero_is_the_identity_bit_for_bit(encoder, stats_pair):
    real, synth = stats_pair
    shift = DomainShift("moment_match", 0.0, "all", real, synth)
    cond = encoder.encode(population(2, 4))
    assert shift.apply(cond) is cond


def test_shared_prefix_has_zero_variance_and_no_nan(encoder, stats_pair):
    real, synth = stats_pair
    pos = int(encoder.id_positions[0])
    assert synth.variance[:pos].max() < 1e-10  # causal prefix: identical for every identity
    out = DomainShift("moment_match", 1.0, "all", real, synth).apply(
        encoder.encode(population(2, 4))
    )
    assert torch.isfinite(out).all()


def test_cli_stats_real_synthetic_merge_compare(tiny_weights, tmp_path, capsys):
    real_npy, synth_npy = tmp_path / "real.npy", tmp_path / "synth.npy"
    save_embeddings(real_npy, population(1, 120))
    save_embeddings(synth_npy, population(2, 120))
    w = ["--weights", str(tiny_weights.root), "--preset", "tiny"]
    assert main(["stats", "real", str(real_npy), "--out", str(tmp_path / "real.stats"), *w]) == 0
    assert (
        main(["stats", "synthetic", str(synth_npy), "--out", str(tmp_path / "synth.stats"), *w])
        == 0
    )
    save_embeddings(tmp_path / "s1.npy", population(2, 120)[:50])
    save_embeddings(tmp_path / "s2.npy", population(2, 120)[50:])
    for part in ("s1", "s2"):
        assert (
            main(
                [
                    "stats",
                    "synthetic",
                    str(tmp_path / f"{part}.npy"),
                    "--out",
                    str(tmp_path / f"{part}.stats"),
                    *w,
                ]
            )
            == 0
        )
    assert (
        main(
            [
                "stats",
                "merge",
                str(tmp_path / "s1.stats"),
                str(tmp_path / "s2.stats"),
                "--out",
                str(tmp_path / "merged.stats"),
            ]
        )
        == 0
    )
    whole, merged = load_stats(tmp_path / "synth.stats"), load_stats(tmp_path / "merged.stats")
    assert merged.count == whole.count == 120
    assert np.allclose(merged.mean, whole.mean, rtol=1e-6, atol=1e-9)
    png = tmp_path / "gap.png"
    capsys.readouterr()
    assert (
        main(
            [
                "stats",
                "compare",
                str(tmp_path / "real.stats"),
                str(tmp_path / "synth.stats"),
                "--png",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000 and "after" in capsys.readouterr().out.lower()


def _shift_config(
    tiny_config, tmp_path, stats_pair, *, outputs: int, method: str, alpha: float, **overrides
):
    """A one-identity tiny conversion with the domain shift on, from ``stats_pair`` saved in
    ``tmp_path``."""
    real, synth = stats_pair
    real.save(tmp_path / "real.stats")
    synth.save(tmp_path / "synth.stats")
    return tiny_config(
        **{
            "source.identities": "first:1",
            "interpolation.outputs_per_identity": outputs,
            "generation.steps": 2,
            "shift.method": method,
            "shift.alpha": alpha,
            "shift.real_stats": str(tmp_path / "real.stats"),
            "shift.synthetic_stats": str(tmp_path / "synth.stats"),
            **overrides,
        }
    )


def test_conversion_with_shift_records_alpha_and_refuses_other_encoder(
    tiny_config, tmp_path, stats_pair
):
    from digi2real.runner.convert import convert
    from digi2real.weights import build_tiny

    config = _shift_config(
        tiny_config, tmp_path, stats_pair, outputs=2, method="mean_shift", alpha=0.5
    )
    convert(config, tmp_path / "out", progress=False)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert rows and all(r["shift_method"] == "mean_shift" and r["shift_alpha"] == 0.5 for r in rows)
    other = build_tiny(tmp_path / "other-weights", seed=1)
    with pytest.raises(ValueError) as info:
        convert(config.override({"weights": str(other.root)}), tmp_path / "out2", progress=False)
    message = str(info.value)
    real, _ = stats_pair
    assert real.meta["encoder_digest"] in message and other.file_digest("encoder") in message


def test_config_yaml_records_what_the_shift_was_made_of(tiny_config, tmp_path, stats_pair):
    import yaml

    from digi2real.runner.convert import convert

    real, synth = stats_pair
    config = _shift_config(
        tiny_config,
        tmp_path,
        stats_pair,
        outputs=1,
        method="moment_match",
        alpha=1.0,
        **{"shift.positions": "varying"},
    )
    convert(config, tmp_path / "out", progress=False)
    record = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    described = record["shift"]
    assert described["method"] == "moment_match" and described["positions"] == "varying"
    from digi2real.weights import sha256_file

    assert described["real_stats_sha256"] == sha256_file(tmp_path / "real.stats")
    assert described["synthetic_stats_sha256"] == sha256_file(tmp_path / "synth.stats")
    assert described["real_count"] == real.count and described["synthetic_count"] == synth.count
    assert 0 < described["corrected_positions"] < 77  # the shared prefix is left alone
    assert record["config"]["shift"]["alpha"] == 1.0
