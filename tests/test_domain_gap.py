"""Fréchet distance and KID against planted Gaussians, streamed in blocks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from digi2real.analysis import domain_gap as dg

DIM = 8


def planted(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a well-conditioned covariance of known values."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=DIM)
    factor = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    return mean, factor @ factor.T + 0.5 * np.eye(DIM)


def draw(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n).astype(np.float32)


def blocks(array: np.ndarray, size: int):
    for start in range(0, len(array), size):
        yield array[start : start + size]


def test_streamed_moments_do_not_depend_on_the_blocks() -> None:
    rows = draw(*planted(1), 5000, seed=2)
    whole = dg.Moments.of(rows)
    for size in (1, 7, 999, 5000):
        streamed = dg.Moments.empty(DIM)
        for block in blocks(rows, size):
            streamed.update(block)
        assert streamed.count == 5000
        np.testing.assert_allclose(streamed.mean, rows.astype(np.float64).mean(0), atol=1e-12)
        np.testing.assert_allclose(streamed.covariance, np.cov(rows.T.astype(np.float64)), 1e-9)
    # merged per shard in another grouping: the same moments
    left, right = dg.Moments.of(rows[:1234]), dg.Moments.of(rows[1234:])
    merged = right.merge(left)
    np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-9)
    assert merged.count == whole.count


def test_frechet_distance_matches_the_closed_form_of_planted_gaussians() -> None:
    mean_a, cov_a = planted(3)
    mean_b, cov_b = planted(4)
    closed = dg.frechet_gaussians(mean_a, cov_a, mean_b, cov_b)
    # an independent spelling of the same closed form: scipy's general matrix square root
    reference = (
        np.sum((mean_a - mean_b) ** 2)
        + np.trace(cov_a + cov_b)
        - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real
    )
    assert closed == pytest.approx(reference, rel=1e-9)
    a = dg.summarize("gallery", blocks(draw(mean_a, cov_a, 40_000, seed=5), 4096), pool=10)
    b = dg.summarize("outputs", blocks(draw(mean_b, cov_b, 40_000, seed=6), 3000), pool=10)
    measured = dg.frechet_distance(a.moments, b.moments)
    assert abs(measured - closed) < 0.02 * closed
    # one distribution against itself: no distance
    assert dg.frechet_gaussians(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0, abs=1e-9)


def test_kid_of_one_distribution_is_zero_within_two_std() -> None:
    mean, cov = planted(7)
    x = draw(mean, cov, 3000, seed=8)
    y = draw(mean, cov, 3000, seed=9)
    value, std, size = dg.kid(x, y, subsets=30, subset_size=400, seed=0)
    assert size == 400 and std > 0
    assert abs(value) < 2 * std
    # deterministic in the seed, different with another
    assert dg.kid(x, y, subsets=30, subset_size=400, seed=0) == (value, std, size)
    assert dg.kid(x, y, subsets=30, subset_size=400, seed=1)[0] != value


def test_unbiased_mmd_matches_its_definition() -> None:
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 1

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / 3 + 1) ** 3)

    within_x = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    within_y = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    across = sum(k(a, b) for a in x for b in y) / 30
    assert dg.polynomial_mmd2(x, y) == pytest.approx(within_x + within_y - 2 * across)


def test_three_planted_shifts_are_ordered_by_both_distances() -> None:
    mean, cov = planted(11)
    gallery = dg.summarize("gallery", [draw(mean, cov, 6000, seed=12)], pool=2000)
    direction = np.random.default_rng(13).normal(size=DIM)
    direction /= np.linalg.norm(direction)
    scores = []
    for step, shift in enumerate((0.0, 0.5, 1.0, 2.0)):
        other = dg.summarize("outputs", [draw(mean + shift * direction, cov, 6000, seed=14 + step)])
        figures = dg.gap_figures(gallery, other, kid_subsets=20, kid_subset_size=500, seed=0)
        # the closed form of a pure mean shift: |shift|^2
        assert figures["fd"] == pytest.approx(shift**2, abs=0.05 + 0.02 * shift**2)
        scores.append((figures["fd"], figures["kid"]))
    fds, kids = zip(*scores, strict=True)
    assert list(fds) == sorted(fds) and list(kids) == sorted(kids)
    assert kids[1] > 2 * dg.gap_figures(gallery, gallery, kid_subsets=20, seed=0)["kid_std"]
    # the fraction of the gap closed: sources at shift 2, outputs at shift 1
    closed = dg.gap_closed(fds[3], fds[2])
    assert closed == pytest.approx(1 - 1 / 4, abs=0.05)
    assert dg.gap_closed(0.0, 1.0) is None


def test_pool_is_a_uniform_sample_independent_of_the_blocks() -> None:
    rows = np.arange(10_000, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    samples = [dg.summarize("x", blocks(rows, size), pool=500).sample for size in (1, 333, 10_000)]
    assert all(np.array_equal(samples[0], s) for s in samples[1:])
    assert len(samples[0]) == 500 and np.all(np.diff(samples[0][:, 0]) > 0)  # stream order
    assert abs(samples[0][:, 0].mean() - 5000) < 500  # uniform over the stream
    other = dg.summarize("y", blocks(rows, 333), pool=500).sample
    assert not np.array_equal(other, samples[0])  # each population draws its own
    assert len(dg.summarize("x", [rows[:10]], pool=500).sample) == 10


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (np.zeros((3, DIM), np.int64), "float32 or float64"),
        (np.full((3, DIM), np.nan, np.float32), "non-finite"),
        (np.zeros(DIM, np.float32), "2-d"),
    ],
)
def test_bad_blocks_are_refused(block: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dg.summarize("bad", [block])


def test_populations_of_different_widths_are_refused() -> None:
    a = dg.summarize("a", [np.ones((4, 3), np.float32) * np.arange(4)[:, None]])
    b = dg.summarize("b", [np.ones((4, 2), np.float32) * np.arange(4)[:, None]])
    with pytest.raises(ValueError, match="same space"):
        dg.gap_figures(a, b)
    with pytest.raises(ValueError, match="2-d rows after 3-d"):
        dg.summarize("c", [np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)])
    with pytest.raises(ValueError, match="no embeddings"):
        dg.summarize("d", [])


def test_principal_axes_find_the_planted_directions() -> None:
    rng = np.random.default_rng(15)
    rows = rng.normal(size=(4000, 3)) * np.array([5.0, 2.0, 0.5])
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    moments = dg.Moments.of(rows @ rotation.T)
    axes = dg.principal_axes(moments)
    assert abs(axes[0] @ rotation[:, 0]) > 0.99 and abs(axes[1] @ rotation[:, 1]) > 0.99
    assert np.all(axes[np.arange(2), np.abs(axes).argmax(axis=1)] > 0)
    spread = dg.project(rows @ rotation.T, moments, axes).std(axis=0)
    np.testing.assert_allclose(spread, [5.0, 2.0], rtol=0.05)
