from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from digi2real import __version__
from digi2real.pipeline.domain_shift import (
    DEFAULT_MAX_SAMPLES,
    ConditioningStats,
    DomainShift,
    compare,
    compute_stats,
    embedding_batches,
    format_compare,
    load_stats,
    merge_stats,
    varying_positions,
)

TOKENS, HIDDEN, ID_DIM, PREFIX = 77, 32, 16, 4
DIGEST = "a" * 64
OTHER_DIGEST = "b" * 64


class StandInEncoder:
    """Deterministic stand-in for Arc2Face's encoder: a fixed random linear map + tanh.

    Like a causal CLIP encoder, the first PREFIX positions (the prompt before the id token)
    do not depend on the identity. ``prefix_offset`` imitates the floating-point drift of
    that constant prefix between the machine that computed one population's stats and
    another.
    """

    def __init__(self, prefix_offset: float = 0.0) -> None:
        rng = np.random.default_rng(1234)
        self.weight = torch.from_numpy(
            rng.standard_normal((ID_DIM, (TOKENS - PREFIX) * HIDDEN)).astype(np.float32)
        )
        self.bias = torch.from_numpy(
            rng.uniform(-0.5, 0.5, (TOKENS - PREFIX) * HIDDEN).astype(np.float32)
        )
        self.prefix = torch.from_numpy(
            (rng.uniform(-1, 1, (PREFIX, HIDDEN)) + prefix_offset).astype(np.float32)
        )

    def __call__(self, embeddings: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        # Row by row: a batched matmul rounds differently with the batch size, and the
        # tests compare statistics across batchings at 1e-10.
        rows = torch.stack([torch.tanh(row @ self.weight + self.bias) for row in x])
        varying = rows.view(-1, TOKENS - PREFIX, HIDDEN)
        return torch.cat([self.prefix.expand(len(x), -1, -1), varying], dim=1)


def population(seed: int, n: int, spread: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(ID_DIM)
    centre /= np.linalg.norm(centre)
    points = centre + spread * rng.standard_normal((n, ID_DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def stats_of(
    embeddings: np.ndarray,
    kind: str,
    *,
    encoder: StandInEncoder | None = None,
    batch_size: int = 50,
    digest: str = DIGEST,
    source: str | None = None,
    max_samples: int = 16,
) -> ConditioningStats:
    return compute_stats(
        embedding_batches(embeddings, batch_size),
        encoder or StandInEncoder(),
        kind=kind,
        encoder_digest=digest,
        source=source or f"{kind} test population",
        created_by="pytest",
        max_samples=max_samples,
    )


@pytest.fixture(scope="module")
def data() -> dict:
    real_encoder = StandInEncoder(prefix_offset=1e-3)
    synth_encoder = StandInEncoder()
    real_embeddings = population(1, 400)
    synth_embeddings = population(2, 300, spread=0.1)
    return {
        "real": stats_of(real_embeddings, "real", encoder=real_encoder),
        "synthetic": stats_of(synth_embeddings, "synthetic", encoder=synth_encoder),
        "synth_cond": synth_encoder(synth_embeddings),
        "synth_embeddings": synth_embeddings,
    }


def empirical(cond: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = cond.double().numpy()
    return array.mean(axis=0), array.var(axis=0)


def test_update_is_welford_exact_in_float64_for_any_dtype() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(3.0, 2.0, (50, 5, 3))
    stats = ConditioningStats((5, 3), kind="real", encoder_digest=DIGEST, source="x")
    stats.update(torch.from_numpy(rows[:20]).to(torch.bfloat16))
    stats.update(rows[20:].astype(np.float16))
    reference = np.concatenate(
        [
            torch.from_numpy(rows[:20]).to(torch.bfloat16).double().numpy(),
            rows[20:].astype(np.float16).astype(np.float64),
        ]
    )
    assert stats.count == 50
    assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64
    np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, reference.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.std, reference.std(axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match=r"\(B, 5, 3\).*\(4, 3, 5\)"):
        stats.update(np.zeros((4, 3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((1, 5, 3), np.nan))


def test_one_pass_equals_merge_of_random_split(tmp_path: Path) -> None:
    embeddings = population(3, 500)
    one_pass = stats_of(embeddings, "real", batch_size=64)
    rng = np.random.default_rng(7)
    assignment = rng.integers(0, 3, len(embeddings))
    parts = [
        stats_of(embeddings[assignment == part], "real", batch_size=size, source=f"part {part}")
        for part, size in zip(range(3), (7, 33, 101), strict=True)
    ]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    paths = [part.save(tmp_path / f"part{index}.stats") for index, part in enumerate(parts)]
    from_files = merge_stats(paths, created_by="digi2real stats merge")
    for candidate in (merged, from_files):
        assert candidate.count == one_pass.count == 500
        np.testing.assert_allclose(candidate.mean, one_pass.mean, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(candidate.m2, one_pass.m2, rtol=1e-10, atol=1e-14)
    assert [part["source"] for part in from_files.parts] == ["part 0", "part 1", "part 2"]
    assert sum(part["count"] for part in from_files.parts) == 500
    assert from_files.created_by == "digi2real stats merge"
    # The merged sample is the bottom-k of the parts' samples, whatever the merge order.
    reordered = parts[2].merge(parts[0]).merge(parts[1])
    np.testing.assert_array_equal(reordered.sample_keys, merged.sample_keys)
    np.testing.assert_array_equal(reordered.samples, merged.samples)


def test_stats_do_not_depend_on_batch_size_and_samples_are_real_rows() -> None:
    embeddings = population(4, 230)
    small = stats_of(embeddings, "synthetic", batch_size=7)
    large = stats_of(embeddings, "synthetic", batch_size=230)
    np.testing.assert_allclose(small.mean, large.mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(small.m2, large.m2, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(small.sample_keys, large.sample_keys)
    assert len(small.samples) == 16
    conditioning = StandInEncoder()(embeddings).numpy().astype(np.float16)
    for sample in small.samples:
        assert (conditioning == sample).all(axis=(1, 2)).any()


def test_real_stats_keep_no_samples_unless_asked(caplog: pytest.LogCaptureFixture) -> None:
    embeddings = population(6, 30)
    kwargs = {"encoder_digest": DIGEST, "source": "thirty faces"}
    real = compute_stats(embedding_batches(embeddings, 8), StandInEncoder(), kind="real", **kwargs)
    synthetic = compute_stats(
        embedding_batches(embeddings, 8), StandInEncoder(), kind="synthetic", **kwargs
    )
    assert len(real.samples) == 0 and real.max_samples == 0
    assert synthetic.max_samples == DEFAULT_MAX_SAMPLES and len(synthetic.samples) == 30
    assert "only 30 faces" in caplog.text


def test_compute_stats_refuses_empty_stream() -> None:
    with pytest.raises(ValueError, match="no embeddings"):
        compute_stats(
            iter([]), StandInEncoder(), kind="real", encoder_digest=DIGEST, source="nothing"
        )


def test_save_load_round_trip(tmp_path: Path, data: dict) -> None:
    stats = data["real"]
    path = stats.save(tmp_path / "real.stats")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    loaded = ConditioningStats.load(path)
    assert loaded.count == stats.count
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.m2, stats.m2)
    np.testing.assert_array_equal(loaded.samples, stats.samples)
    np.testing.assert_array_equal(loaded.sample_keys, stats.sample_keys)
    assert loaded.meta == stats.meta
    assert loaded.kind == "real" and loaded.encoder_digest == DIGEST
    assert loaded.version == __version__ and loaded.created_by == "pytest"
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.checksum() == stats.checksum() == file_sha
    # Deterministic bytes: saving the loaded copy reproduces the file.
    again = loaded.save(tmp_path / "again.stats")
    assert again.read_bytes() == path.read_bytes()

    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    assert tensors["count"].dtype == np.float64 and tensors["count"].shape == ()
    bad_shape = dict(tensors, m2=np.zeros((3, 3)))
    header = {"format": "digi2real.conditioning_stats", "meta": json.dumps(stats.meta)}
    save_file(bad_shape, tmp_path / "bad.stats", metadata={**header, "format_version": "1"})
    with pytest.raises(ValueError, match="mean and m2"):
        ConditioningStats.load(tmp_path / "bad.stats")
    save_file(tensors, tmp_path / "future.stats", metadata={**header, "format_version": "99"})
    with pytest.raises(ValueError, match="version '99'"):
        ConditioningStats.load(tmp_path / "future.stats")
    save_file(tensors, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a digi2real stats file"):
        ConditioningStats.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.stats"):
        ConditioningStats.load(tmp_path / "missing.stats")
    with pytest.raises(ValueError, match="empty"):
        ConditioningStats((2, 2), kind="real", encoder_digest=DIGEST, source="x").save(
            tmp_path / "empty.stats"
        )


def test_mismatched_encoder_digest_is_refused(tmp_path: Path, data: dict) -> None:
    path = data["real"].save(tmp_path / "real.stats")
    with pytest.raises(ValueError) as error:
        load_stats(path, expected_encoder_digest=OTHER_DIGEST)
    message = str(error.value)
    assert DIGEST in message and OTHER_DIGEST in message and "real.stats" in message
    with pytest.raises(ValueError, match="'real' stats, expected 'synthetic'"):
        load_stats(path, expected_kind="synthetic")
    other = stats_of(population(5, 40), "synthetic", digest=OTHER_DIGEST)
    with pytest.raises(ValueError, match=f"{DIGEST}.*{OTHER_DIGEST}"):
        DomainShift("mean_shift", 1.0, "all", data["real"], other)
    with pytest.raises(ValueError, match="different encoders"):
        data["synthetic"].merge(other)
    with pytest.raises(ValueError, match="'synthetic' stats with 'real'"):
        data["synthetic"].merge(data["real"])
    synth_path = data["synthetic"].save(tmp_path / "synth.stats")
    with pytest.raises(ValueError, match=OTHER_DIGEST):
        DomainShift.from_files("mean_shift", 1.0, "all", path, synth_path, OTHER_DIGEST)


def test_mean_shift_alpha_one_matches_real_mean(data: dict) -> None:
    shift = DomainShift("mean_shift", 1.0, "all", data["real"], data["synthetic"])
    corrected = shift.apply(data["synth_cond"])
    assert corrected.dtype == torch.float32 and corrected.shape == data["synth_cond"].shape
    mean, variance = empirical(corrected)
    np.testing.assert_allclose(mean, data["real"].mean, atol=1e-5)
    # A pure shift keeps the synthetic spread.
    np.testing.assert_allclose(variance, data["synthetic"].variance, rtol=1e-3, atol=1e-9)
    assert not np.allclose(data["synthetic"].mean, data["real"].mean, atol=1e-2)


def test_moment_match_alpha_one_matches_mean_and_variance(data: dict) -> None:
    shift = DomainShift("moment_match", 1.0, "all", data["real"], data["synthetic"])
    mean, variance = empirical(shift.apply(data["synth_cond"]))
    np.testing.assert_allclose(mean, data["real"].mean, atol=1e-5)
    np.testing.assert_allclose(variance, data["real"].variance, rtol=1e-3, atol=1e-9)
    assert not np.allclose(data["synthetic"].variance, data["real"].variance, rtol=0.1)


@pytest.mark.parametrize("method", ["mean_shift", "moment_match"])
def test_partial_alpha_and_analytic_moments_match_applied_shift(method: str, data: dict) -> None:
    shift = DomainShift(method, 0.4, "varying", data["real"], data["synthetic"])
    mean, variance = empirical(shift.apply(data["synth_cond"]))
    analytic_mean, analytic_variance = shift.corrected_stats()
    np.testing.assert_allclose(mean, analytic_mean, atol=1e-5)
    np.testing.assert_allclose(variance, analytic_variance, rtol=1e-3, atol=1e-9)
    expected_mean = data["synthetic"].mean + 0.4 * (data["real"].mean - data["synthetic"].mean)
    varying = shift.position_mask
    np.testing.assert_allclose(analytic_mean[varying], expected_mean[varying], atol=1e-12)


@pytest.mark.parametrize("method", ["mean_shift", "moment_match"])
def test_alpha_zero_returns_the_input_itself(method: str, data: dict) -> None:
    shift = DomainShift(method, 0.0, "all", data["real"], data["synthetic"])
    cond = data["synth_cond"].to(torch.float16)
    before = cond.clone()
    assert shift.apply(cond) is cond
    assert torch.equal(cond, before)


def test_zero_or_tiny_synthetic_variance_gives_finite_mean_shift(data: dict) -> None:
    one_face = np.repeat(data["synth_embeddings"][:1], 10, axis=0)
    flat = stats_of(one_face, "synthetic")
    assert (flat.variance == 0).all()
    cond = StandInEncoder()(one_face)
    matched = DomainShift("moment_match", 1.0, "all", data["real"], flat).apply(cond)
    shifted = DomainShift("mean_shift", 1.0, "all", data["real"], flat).apply(cond)
    assert torch.isfinite(matched).all()
    torch.testing.assert_close(matched, shifted)

    rng = np.random.default_rng(0)
    base = cond[:1].double().numpy()
    tiny = ConditioningStats((TOKENS, HIDDEN), kind="synthetic", encoder_digest=DIGEST, source="t")
    tiny.update(base + 1e-9 * rng.standard_normal((10, TOKENS, HIDDEN)))
    near = DomainShift("moment_match", 1.0, "all", data["real"], tiny).apply(cond)
    assert torch.isfinite(near).all()
    assert (near - cond).abs().max() < 10 * np.abs(data["real"].mean - tiny.mean).max()


def test_varying_positions_leave_the_constant_prefix_untouched(data: dict) -> None:
    mask = varying_positions(data["real"], data["synthetic"])
    np.testing.assert_array_equal(mask, np.arange(TOKENS) >= PREFIX)
    cond = data["synth_cond"]
    for method in ("mean_shift", "moment_match"):
        varying = DomainShift(method, 1.0, "varying", data["real"], data["synthetic"])
        every = DomainShift(method, 1.0, "all", data["real"], data["synthetic"])
        out_varying, out_every = varying.apply(cond), every.apply(cond)
        assert torch.equal(out_varying[:, :PREFIX], cond[:, :PREFIX])
        # "all" moves the prefix by the drift between the two encoders' constant outputs.
        assert not torch.equal(out_every[:, :PREFIX], cond[:, :PREFIX])
        torch.testing.assert_close(out_varying[:, PREFIX:], out_every[:, PREFIX:])
        assert not torch.allclose(out_varying[:, PREFIX:], cond[:, PREFIX:])


def test_apply_dtype_device_cache_and_shape_errors(data: dict) -> None:
    shift = DomainShift("moment_match", 0.7, "varying", data["real"], data["synthetic"])
    cond = data["synth_cond"][:5]
    half = shift.apply(cond.to(torch.float16))
    double = shift.apply(cond.double())
    single = shift.apply(cond)
    assert half.dtype == torch.float16 and double.dtype == torch.float64
    # Half inputs are computed in float32 and rounded back once.
    assert torch.equal(half, shift.apply(cond.half().float()).half())
    torch.testing.assert_close(double.float(), single, atol=1e-5, rtol=1e-5)
    shift.apply(cond)
    # float16 and float32 inputs share the float32 coefficients; float64 has its own.
    assert len(shift._device_cache) == 2
    with pytest.raises(ValueError, match=r"\(5, 76, 32\).*\(B, 77, 32\)"):
        shift.apply(cond[:, 1:])
    with pytest.raises(ValueError, match="floating-point"):
        shift.apply(cond.long())


def test_invalid_settings_are_refused(data: dict) -> None:
    real, synthetic = data["real"], data["synthetic"]
    with pytest.raises(ValueError, match="mean_shift, moment_match"):
        DomainShift("histogram", 1.0, "all", real, synthetic)
    with pytest.raises(ValueError, match="all, varying"):
        DomainShift("mean_shift", 1.0, "id_token", real, synthetic)
    for alpha in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            DomainShift("mean_shift", alpha, "all", real, synthetic)
    with pytest.raises(ValueError, match="expected real then synthetic"):
        DomainShift("mean_shift", 1.0, "all", synthetic, real)
    narrow = ConditioningStats((TOKENS, 16), kind="synthetic", encoder_digest=DIGEST, source="n")
    narrow.update(np.zeros((2, TOKENS, 16)))
    with pytest.raises(ValueError, match=r"\(77, 32\) but synthetic stats \(77, 16\)"):
        DomainShift("mean_shift", 1.0, "all", real, narrow)
    with pytest.raises(ValueError, match="kind must be one of real, synthetic"):
        ConditioningStats((2, 2), kind="fake", encoder_digest=DIGEST, source="x")


def test_from_files_and_describe(tmp_path: Path, data: dict) -> None:
    real_path = data["real"].save(tmp_path / "real.stats")
    synth_path = data["synthetic"].save(tmp_path / "synth.stats")
    shift = DomainShift.from_files("moment_match", 0.5, "varying", real_path, synth_path, DIGEST)
    described = shift.describe()
    assert described["method"] == "moment_match" and described["alpha"] == 0.5
    assert described["positions"] == "varying"
    assert described["real_stats_sha256"] == hashlib.sha256(real_path.read_bytes()).hexdigest()
    assert (
        described["synthetic_stats_sha256"] == hashlib.sha256(synth_path.read_bytes()).hexdigest()
    )
    assert described["corrected_positions"] == TOKENS - PREFIX
    json.dumps(described)
    with pytest.raises(ValueError, match="'synthetic' stats, expected 'real'"):
        DomainShift.from_files("mean_shift", 1.0, "all", synth_path, real_path, DIGEST)


@pytest.mark.parametrize("method", ["mean_shift", "moment_match"])
def test_compare_reports_smaller_gap_after_and_writes_png(
    method: str, tmp_path: Path, data: dict
) -> None:
    real, synthetic = data["real"], data["synthetic"]
    shift = DomainShift(method, 1.0, "varying", real, synthetic)
    out_png = tmp_path / "plots" / "gap.png"
    result = compare(real, synthetic, shift=shift, out_png=out_png)
    before, after = result["before"], result["after"]
    before_per_position = np.asarray(before["mean_distance_per_position"])
    after_per_position = np.asarray(after["mean_distance_per_position"])
    assert after_per_position[PREFIX:].max() < 1e-6 < before_per_position[PREFIX:].min()
    # positions="varying" leaves the prefix, and its small drift, as it was.
    np.testing.assert_array_equal(after_per_position[:PREFIX], before_per_position[:PREFIX])
    assert after["mean_distance"] < 0.05 * before["mean_distance"]
    # The analytic "after" agrees with applying the shift to the population.
    mean, _ = empirical(shift.apply(data["synth_cond"]))
    applied = np.linalg.norm(real.mean - mean, axis=1)
    np.testing.assert_allclose(after["mean_distance_per_position"], applied, atol=1e-5)
    if method == "moment_match":
        assert after["variance_ratio"]["mean_abs_log10"] < 1e-6
        assert before["variance_ratio"]["mean_abs_log10"] > 0.05
    else:
        assert after["variance_ratio"] == pytest.approx(before["variance_ratio"])
    assert result["varying_positions"] == list(range(PREFIX, TOKENS))
    assert result["projection"] == "stored samples"
    png = out_png.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    json.dumps(result)

    table = format_compare(result)
    assert "before" in table and "after" in table and method in table
    assert f"{before['mean_distance']:.4g}" in table


def test_compare_without_shift_or_samples_uses_gaussian_draws(tmp_path: Path, data: dict) -> None:
    real = stats_of(population(1, 100), "real", max_samples=0)
    synthetic = stats_of(population(2, 100), "synthetic", max_samples=0)
    assert len(real.samples) == 0
    result = compare(real, synthetic, out_png=tmp_path / "gap.png")
    assert result["after"] is None and result["shift"] is None
    assert result["projection"].startswith("Gaussian draws")
    assert (tmp_path / "gap.png").stat().st_size > 10_000
    table = format_compare(result)
    assert "-" in table.splitlines()[-1]
    distances = result["before"]["mean_distance_per_position"]
    assert distances[:PREFIX] == [0.0] * PREFIX and min(distances[PREFIX:]) > 0
