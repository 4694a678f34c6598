"""Nearest neighbours at any folder size (engine/neighbours.py): the partitioned search above EXACT_UP_TO finds
what the exact one finds on clustered embeddings, and never reports a neighbour nearer than the true one; the
k-means behind it sums each cluster's rows right."""

import numpy as np

from engine.neighbours import _sums, kmeans, most_similar


def _clustered(n: int, dim: int, groups: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)).astype(np.float32)
    X = centres[rng.integers(groups, size=n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_cluster_sums_match_a_dense_membership_product():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 7)).astype(np.float32)
    lab = rng.integers(0, 9, size=500)
    lab[lab == 4] = 5  # an empty cluster
    dense = np.stack([X[lab == c].sum(0) for c in range(9)])
    assert np.allclose(_sums(X, lab, 9), dense, atol=1e-4)


def test_partitioned_search_finds_the_exact_nearest_neighbours():
    X = _clustered(3000, 32, 40, seed=1)
    exact_s, exact_i = most_similar(X, X, 1, exclude_self=True, exact=True)
    part_s, part_i = most_similar(X, X, 1, exclude_self=True, exact=False)
    assert (part_i[:, 0] == exact_i[:, 0]).mean() >= 0.99
    assert (part_s[:, 0] <= exact_s[:, 0] + 1e-5).all()  # never nearer than the true nearest
    lab = kmeans(X, 40, seed=0)
    assert len(np.unique(lab)) >= 30  # the clusters found are the folder's groups, not a few big ones
