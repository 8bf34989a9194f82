"""The paper's Table 5: instance loss on K pseudo-classes instead of one class per image.

The classes are k-means clusters of the training images' pool5 features (the frozen ImageNet
backbone's globally pooled output; the paper: ResNet-50, K = 3,000 and 10,000 on MSCOCO),
computed once per run and recorded in the workdir (PSEUDO_CLASSES_FILE), so a resume, and
Stage II from Stage I, train on the same labels.

The k-means is a short JAX one (Lloyd's iterations from k-means++ seeds, distances as matrix
products so an accelerator does the work; an empty cluster keeps its centroid, as scipy's
kmeans2 does). tests/test_pseudo_classes.py checks it against scipy.cluster.vq.kmeans2 from the
same seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from instance_loss_jax import paths
from instance_loss_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PSEUDO_CLASSES_FILE = "pseudo_classes.json"


def kmeans_plus_plus(features, k: int, key) -> jax.Array:
  """k-means++ seeds (Arthur and Vassilvitskii, 2007): k rows of `features` [n, d], each drawn
  with probability proportional to its squared distance to the nearest seed drawn before."""
  x = jnp.asarray(features, jnp.float32)
  sq = jnp.sum(x * x, axis=1)
  key, first = jax.random.split(key)
  start = x[jax.random.randint(first, (), 0, x.shape[0])]

  def distance_to(c):
    return jnp.maximum(sq - 2.0 * x @ c + c @ c, 0.0)

  def body(i, carry):
    seeds, d2, key = carry
    key, draw = jax.random.split(key)
    weights = jnp.where(jnp.sum(d2) > 0, d2, 1.0)  # all rows on seeds: uniform
    c = x[jax.random.categorical(draw, jnp.log(weights))]
    return seeds.at[i].set(c), jnp.minimum(d2, distance_to(c)), key

  seeds = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(start)
  seeds, _, _ = jax.lax.fori_loop(1, k, body, (seeds, distance_to(start), key))
  return seeds


@functools.partial(jax.jit, static_argnames="block_rows")
def assign(features, centroids, block_rows: int = 4096) -> jax.Array:
  """Each row's nearest centroid [n] (int32), in blocks of rows (an [n, k] distance matrix of
  113k images and 10k classes would be 4.5 GB)."""
  x = jnp.asarray(features, jnp.float32)
  n = x.shape[0]
  pad = -n % block_rows
  blocks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block_rows, x.shape[1])
  c_sq = jnp.sum(centroids * centroids, axis=1)
  # ||x||^2 is the same for every centroid of a row: argmin needs -2 x.c + ||c||^2 only.
  nearest = jax.lax.map(lambda b: jnp.argmin(c_sq[None, :] - 2.0 * b @ centroids.T, axis=1),
                        blocks)
  return nearest.reshape(-1)[:n].astype(jnp.int32)


@jax.jit
def update(features, labels, centroids) -> jax.Array:
  """Each cluster's mean; an empty cluster keeps its centroid."""
  x = jnp.asarray(features, jnp.float32)
  k = centroids.shape[0]
  sums = jax.ops.segment_sum(x, labels, k)
  counts = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), labels, k)
  return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)


def kmeans(features, k: int, seed: int, iterations: int = 100, centroids=None
           ) -> tuple[np.ndarray, np.ndarray]:
  """(labels [n] int32, centroids [k, d]): Lloyd's iterations from `centroids` (default:
  k-means++ seeds drawn from `seed`) until no label changes, at most `iterations` times."""
  x = jnp.asarray(features, jnp.float32)
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f"k={k}: need 1 <= k <= {x.shape[0]} rows")
  if centroids is None:
    centroids = kmeans_plus_plus(x, k, jax.random.key(seed))
  centroids = jnp.asarray(centroids, jnp.float32)
  labels = assign(x, centroids)
  for _ in range(iterations):
    centroids = update(x, labels, centroids)
    new = assign(x, centroids)
    if bool(jnp.all(new == labels)):
      break
    labels = new
  return np.asarray(labels), np.asarray(centroids)


def _fingerprint(image_paths: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(image_paths).encode("utf-8")).hexdigest()[:16]


def relabel(config, train_records: list, recorded: dict[str, Any] | None,
            features_of: Callable[[Sequence[str]], np.ndarray]):
  """(records with `label` = pseudo-class, the record to keep in the workdir): from `recorded`
  (the run's own, or init_from's) when given, else k-means over `features_of(image paths)`."""
  k = int(config.data.pseudo_classes)
  image_paths = [r.image_path for r in train_records]
  fingerprint = _fingerprint(image_paths)
  if recorded is None:
    if not config.backbone_init:
      raise ConfigError(f"data.pseudo_classes={k}: no recorded pseudo-classes here or in "
                        "init_from, and no backbone_init to compute them from")
    log.info("pseudo-classes: pool5 features of %d training images from %s", len(image_paths),
             config.backbone_init)
    features = features_of(image_paths)
    labels, _ = kmeans(features, k, config.seed, config.data.pseudo_classes_iterations)
    counts = np.bincount(labels, minlength=k)
    log.info("pseudo-classes: %d clusters (k-means, seed %d), %d empty, largest %d images",
             k, config.seed, int(np.sum(counts == 0)), int(counts.max()))
    recorded = dict(k=k, images=fingerprint, source=config.backbone_init, seed=config.seed,
                    labels=[int(v) for v in labels])
  elif recorded.get("k") != k or recorded.get("images") != fingerprint:
    raise DataError(f"the recorded pseudo-classes ({PSEUDO_CLASSES_FILE}: k={recorded.get('k')})"
                    f" are not those of data.pseudo_classes={k} on these training images")
  labels = recorded["labels"]
  return [dataclasses.replace(r, label=int(c)) for r, c in zip(train_records, labels)], recorded


def read_recorded(directory: str) -> dict[str, Any] | None:
  """A run's recorded pseudo-classes, or None."""
  file = paths.join(directory, PSEUDO_CLASSES_FILE)
  return paths.read_json(file, DataError) if paths.path(file).is_file() else None


def write_recorded(directory: str, recorded: dict[str, Any]) -> str:
  return paths.write_text(paths.join(directory, PSEUDO_CLASSES_FILE), json.dumps(recorded))
