"""Inference shared by the evaluation and the Index: the inference-mode embedding functions of a
run's model, embedding rows in fixed-size batches, and a blocked top-k search whose device memory
does not grow with the gallery."""

from __future__ import annotations

import functools
import logging
import time

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instance_loss_jax import sharding
from instance_loss_jax.models import build_model, l2_normalize

log = logging.getLogger(__name__)


def make_embed_fns(config: ml_collections.ConfigDict, mesh=None):
  """Inference-mode (no dropout, running BN statistics) feature extractors over `mesh` (default:
  this process's devices), the batch split over the devices.

  Returns (embed_images(variables, images, flip_average), embed_texts(variables, tokens,
  summand=False)). An embedding is the L2-normalised sum of per-view summands: with
  `flip_average`, the image's and its mirror's; a caption's shift offsets are summed by the
  caller (`summand=True` returns the summand). `config.eval.features` says what a summand is:
  "after_relu", the head's output after its last ReLU, L2-normalised; "original", the last
  BatchNorm's raw output before that ReLU, as the original's test scripts read (docs/design.md).
  The batch must divide over the devices. `place_variables` puts host variables on the mesh once
  (replicated; W_share left out).
  """
  model = build_model(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
  # A run config recorded before eval.features existed embedded after the ReLU.
  original = config.eval.get("features", "after_relu") == "original"

  def view_summand(variables, x, method):
    features = model.apply(variables, x, final_relu=not original, method=method)
    return features.astype(jnp.float32) if original else l2_normalize(features)

  def embed_images(variables, images, flip_average):
    total = view_summand(variables, images, "image_features")
    if flip_average:
      total = total + view_summand(variables, images[:, :, ::-1], "image_features")
    return l2_normalize(total)

  def embed_texts(variables, tokens, as_summand):
    one = view_summand(variables, tokens, "text_features")
    return one if as_summand else l2_normalize(one)

  images_fn = jax.jit(embed_images, static_argnums=(2,), out_shardings=rows)
  texts_fn = jax.jit(embed_texts, static_argnums=(2,), out_shardings=rows)
  put = lambda x: jax.device_put(np.asarray(x), rows)
  return (lambda v, x, flip: images_fn(v, put(x), flip),
          lambda v, x, summand=False: texts_fn(v, put(x), summand))


def place_variables(variables: dict[str, Any], mesh=None) -> dict[str, Any]:
  """Host variables replicated on `mesh` (default: this process's devices) for the embed
  functions; W_share, which they do not use, stays behind."""
  mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
  params = {k: v for k, v in variables["params"].items() if k != sharding.W_SHARE}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put({"params": params, "batch_stats": variables["batch_stats"]}, replicated)


def embed_chunks(chunks, total: int, what: str, size: int, embed):
  """Embeds numpy chunks of rows in batches of `size` (the last one padded)."""
  out, done, started = [], 0, time.time()
  for chunk in chunks:
    for lo in range(0, len(chunk), size):
      rows = chunk[lo:lo + size]
      padded = np.zeros((size,) + rows.shape[1:], rows.dtype)
      padded[:len(rows)] = rows
      out.append(np.asarray(embed(padded))[:len(rows)])
      done += len(rows)
    log.info("embedded %d/%d %s (%.0f/s)", done, total, what,
             done / max(time.time() - started, 1e-9))
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(queries, block, valid, offset, best_scores, best_index, *, k):
  scores = queries @ block.astype(jnp.float32).T
  scores = jnp.where(jnp.arange(block.shape[0]) < valid, scores, -jnp.inf)
  scores, index = jax.lax.top_k(scores, min(k, block.shape[0]))
  index = jnp.where(jnp.isneginf(scores), -1, index + offset)  # padding rows are no hit
  scores = jnp.concatenate([best_scores, scores], axis=1)
  index = jnp.concatenate([best_index, index], axis=1)
  scores, pick = jax.lax.top_k(scores, k)
  return scores, jnp.take_along_axis(index, pick, axis=1)


def top_k(queries, gallery, k: int = 10, block_rows: int = 65536):
  """The k most similar gallery rows (dot product) of each query: (scores [Q, k], rows [Q, k]).

  The gallery (numpy, any float dtype, in host memory or memory-mapped) goes to the device one
  block of `block_rows` rows at a time; each block's top-k (jax.lax.top_k) is merged into the
  running one, so device memory holds one block and Q x block scores whatever the gallery's
  size. Rows beyond the gallery (k > N) come back with score -inf and row -1.
  """
  queries = jnp.asarray(np.asarray(queries, np.float32))
  n = len(gallery)
  block_rows = max(1, min(block_rows, n))
  best_scores = jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32)
  best_index = jnp.full((queries.shape[0], k), -1, jnp.int32)
  for lo in range(0, n, block_rows):
    block = np.asarray(gallery[lo:lo + block_rows])
    valid = len(block)
    if valid < block_rows:  # one shape for every block: one compile
      block = np.concatenate([block, np.zeros((block_rows - valid,) + block.shape[1:],
                                              block.dtype)])
    best_scores, best_index = _merge_block(queries, block, valid, lo, best_scores, best_index,
                                           k=k)
    # Dispatch is asynchronous: without this wait every block would be copied in before the
    # first is scored, and memory would grow with the gallery.
    best_scores.block_until_ready()
  return np.asarray(best_scores), np.asarray(best_index)
