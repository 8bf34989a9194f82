"""Inference building blocks shared by the evaluation and the Index: embedding rows in fixed-size
batches, and a blocked top-k search whose device memory does not grow with the gallery."""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


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
