from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from digi2real.analysis import metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """600 rows of 30 identities in 16-d, shuffled so no identity is contiguous."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((30, 16)))
    labels = rng.permutation(np.repeat(np.arange(30), 20))
    rows = _unit(centres[labels] + 0.3 * rng.standard_normal((600, 16)))
    return rows, labels


def _brute_centroids(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    sums = np.stack([rows[labels == k].sum(0) for k in range(labels.max() + 1)])
    return _unit(sums)


def test_centroids_stream_in_blocks_and_from_mmap(clustered, tmp_path: Path) -> None:
    rows, labels = clustered
    path = tmp_path / "rows.npy"
    np.save(path, rows)
    mapped = np.load(path, mmap_mode="r")
    expected = _brute_centroids(rows, labels)
    for source, block in ((rows, 7), (mapped, 64), (mapped, 10_000)):
        centroids, counts = metrics.identity_centroids(source, labels, block=block)
        np.testing.assert_allclose(centroids, expected, atol=1e-6)
        assert counts.tolist() == [20] * 30
    np.testing.assert_array_equal(np.asarray(mapped), rows)  # releasing pages lost nothing


def test_centroids_check_dtype_and_labels(clustered) -> None:
    rows, labels = clustered
    with pytest.raises(ValueError, match="float32"):
        metrics.identity_centroids(rows.astype(np.float64), labels)
    with pytest.raises(ValueError, match="integer"):
        metrics.identity_centroids(rows, labels.astype(np.float32))
    with pytest.raises(ValueError, match="no rows"):
        metrics.identity_centroids(rows, np.where(labels == 3, 30, labels))
    with pytest.raises(ValueError, match="600 entries"):
        metrics.identity_centroids(rows, labels[:-1])


def test_nearest_other_matches_brute_force_across_blocks(clustered) -> None:
    rows, labels = clustered
    centroids = _brute_centroids(rows, labels)
    scores, indices = metrics.nearest_other(centroids, k=3, block=4)
    gram = centroids @ centroids.T
    np.fill_diagonal(gram, -np.inf)
    expected = np.argsort(-gram, axis=1)[:, :3]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(gram, expected, 1), atol=1e-5)


def test_nearest_other_never_returns_self_among_duplicates() -> None:
    rng = np.random.default_rng(3)
    centroids = _unit(rng.standard_normal((5, 8)))
    centroids[[1, 2, 3]] = centroids[0]  # four identical rows: self may not rank first
    scores, indices = metrics.nearest_other(centroids, k=2)
    assert all(i not in row for i, row in enumerate(indices.tolist()))
    np.testing.assert_allclose(scores[:4], 1.0, atol=1e-5)
    scores, indices = metrics.nearest_other(centroids[:2], k=3)
    assert indices.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert np.isneginf(scores[:, 1:]).all()


def test_collision_pairs_exact_and_each_pair_once(clustered) -> None:
    rows, labels = clustered
    centroids = _brute_centroids(rows, labels)
    threshold = float(np.sort((centroids @ centroids.T)[np.triu_indices(30, 1)])[-12])
    expected = [tuple(p) for p in np.argwhere(np.triu(centroids @ centroids.T >= threshold, 1))]
    pairs = metrics.collision_pairs(centroids, threshold, block=5)
    assert [(i, j) for i, j, _ in pairs] == [tuple(map(int, p)) for p in expected]
    assert len(pairs) >= 12 and all(i < j and s >= threshold for i, j, s in pairs)
    nearest, _ = metrics.nearest_other(centroids)
    assert metrics.collision_pairs(centroids, threshold, nearest_scores=nearest) == pairs
    assert metrics.collision_pairs(centroids, 1.01) == []


def test_leakage_finds_planted_identity_by_centroid_and_by_image() -> None:
    rng = np.random.default_rng(5)
    basis, _ = np.linalg.qr(rng.standard_normal((32, 12)))
    basis = basis.T.astype(np.float32)
    gallery = _unit(np.repeat(basis[:4], 3, axis=0) + 0.05 * rng.standard_normal((12, 32)))
    gallery_labels = np.repeat(np.arange(4), 3)
    generated_centres = basis[4:10].copy()
    generated_centres[2] = basis[1]  # identity 2 is a gallery person
    labels = np.repeat(np.arange(6), 4)
    generated = _unit(generated_centres[labels] + 0.05 * rng.standard_normal((24, 32)))
    generated[21] = basis[3]  # one image of identity 5 is a gallery face; its centroid is not
    leaks = metrics.leakage(generated, labels, gallery, gallery_labels, 0.8, block=5)
    assert [leak.label for leak in leaks] == [2, 5]
    assert leaks[0].matched == ("centroid", "image") and leaks[0].gallery_label == 1
    assert leaks[1].matched == ("image",) and leaks[1].image_row == 21
    assert leaks[1].image_gallery_label == 3 and leaks[1].centroid_score < 0.8
    # Without gallery labels every row is its own identity: row indices come back.
    leaks = metrics.leakage(generated, labels, gallery, None, 0.8)
    assert [leak.label for leak in leaks] == [2, 5]
    assert leaks[1].image_gallery_label in (9, 10, 11)
    with pytest.raises(ValueError, match="same recognizer"):
        metrics.leakage(generated, labels, gallery[:, :16].copy(), None, 0.8)


def test_near_duplicates_within_identity_only(clustered) -> None:
    rows, labels = clustered
    rows = rows.copy()
    first, second = np.flatnonzero(labels == 7)[:2]
    rows[second] = rows[first]
    other = np.flatnonzero(labels == 8)[0]
    rows[other] = rows[first]  # same vector under another identity: not a near duplicate
    pairs = metrics.near_duplicates(rows, labels, 0.99, block=50)
    assert [(i, j) for i, j, _ in pairs] == [(min(first, second), max(first, second))]
    threshold = 0.8
    gram = rows @ rows.T
    expected = [
        (i, j)
        for i in range(600)
        for j in range(i + 1, 600)
        if labels[i] == labels[j] and gram[i, j] >= threshold
    ]
    assert [(i, j) for i, j, _ in metrics.near_duplicates(rows, labels, threshold, block=33)] == (
        expected
    )


def test_diversity_and_intra_inter_samples(clustered) -> None:
    rows, labels = clustered
    sums, counts = metrics.identity_sums(rows, labels, block=100)
    diversity = metrics.mean_pairwise_distance(sums, counts)
    for k in (0, 11, 29):
        members = rows[labels == k]
        gram = members @ members.T
        assert diversity[k] == pytest.approx(1 - gram[np.triu_indices(20, 1)].mean(), abs=1e-5)
    single = metrics.mean_pairwise_distance(sums[:1], np.array([1]))
    assert np.isnan(single[0])

    intra, inter = metrics.intra_inter_samples(rows, labels, block=64)
    centroids = _brute_centroids(rows, labels)
    np.testing.assert_allclose(intra, np.einsum("nd,nd->n", rows, centroids[labels]), atol=1e-5)
    gram = centroids @ centroids.T
    np.fill_diagonal(gram, -np.inf)
    np.testing.assert_allclose(inter, gram.max(1), atol=1e-5)
    assert intra.mean() > inter.max()  # well-separated clusters


def test_encode_labels_sorted_order() -> None:
    codes, names = metrics.encode_labels(["b", "a", "c", "a"])
    assert names == ["a", "b", "c"] and codes.tolist() == [1, 0, 2, 0]
