"""Table 5's pseudo-classes (data/pseudo_classes.py): the k-means against scipy's from the same
seeds, the k-means++ seeds' draw, and the labels a run trains on."""

import jax
import numpy as np
import pytest
from scipy.cluster import vq

from instance_loss_jax.data import pseudo_classes


def blobs(n=400, d=8, k=12, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (k, d))
  return (centres[rng.integers(0, k, n)] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


def test_lloyd_matches_scipy_from_the_same_seeds():
  # Overlapping blobs (several iterations to converge), seeds from k-means++: our iterations and
  # scipy.cluster.vq.kmeans2's (minit="matrix": the same seeds) end at the same labels and means.
  x = blobs()
  seeds = np.asarray(pseudo_classes.kmeans_plus_plus(x, 12, jax.random.key(1)))
  ours, centroids = pseudo_classes.kmeans(x, 12, seed=0, iterations=100, centroids=seeds)
  theirs_centroids, theirs = vq.kmeans2(x.astype(np.float64), seeds.astype(np.float64), iter=100,
                                        minit="matrix", missing="warn")
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_allclose(centroids, theirs_centroids, rtol=1e-5, atol=1e-5)
  # Not a trivial fixed point: the seeds' own assignment differs from the final one.
  assert np.mean(vq.vq(x, seeds)[0] != ours) > 0.02


def test_assignment_in_blocks_is_the_nearest_centroid():
  x, c = blobs(n=1000, seed=2), blobs(n=37, seed=3)
  want = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(pseudo_classes.assign(x, c, block_rows=128), want)


def test_kmeans_plus_plus_draws_distinct_rows_far_apart():
  # Two tight groups far apart, k = 2: D^2 sampling takes one seed from each (uniform seeds
  # would take both from the larger group 81% of the time).
  rng = np.random.default_rng(4)
  x = np.concatenate([rng.normal(0, 0.01, (90, 4)), 100 + rng.normal(0, 0.01, (10, 4))])
  for seed in range(5):
    seeds = np.asarray(pseudo_classes.kmeans_plus_plus(x, 2, jax.random.key(seed)))
    assert {int(s[0] > 50) for s in seeds} == {0, 1}
    assert all(any(np.array_equal(s, row) for row in x.astype(np.float32)) for s in seeds)


def test_an_empty_cluster_keeps_its_centroid():
  x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]], np.float32)
  start = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]], np.float32)
  labels, centroids = pseudo_classes.kmeans(x, 3, seed=0, centroids=start)
  np.testing.assert_array_equal(labels, [0, 0, 1])
  np.testing.assert_allclose(centroids, [[0.05, 0.0], [5.0, 5.0], [100.0, 100.0]])


def test_k_is_checked():
  with pytest.raises(ValueError, match="k=5"):
    pseudo_classes.kmeans(np.zeros((4, 2), np.float32), 5, seed=0)
