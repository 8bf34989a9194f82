"""Instance loss, the bidirectional ranking loss, and their weighted sum (paper eqs. 4-9); and,
as eq. 9's ranking term instead of the hinge (`loss.ranking`), CLIP's InfoNCE and SigLIP's
sigmoid loss with their learned temperature (and bias).

Public API. What the train step (training/step.py) assembles its objective from, on the mesh:
  instance_loss_per_row(logits, labels, num_classes, axis_name=None)  (W_share split over classes)
  ranking_loss_against(img_emb, txt_emb, labels, pool_img, pool_txt, pool_labels, margin,
                       negatives, rng, mined_txt_emb, mined_labels, anchor_rows=(0, None))
                       (this device's anchors against the global batch's negatives)
  infonce_loss_against(img_emb, txt_emb, labels, pool_img, pool_txt, pool_labels, log_scale,
                       max_log_scale, anchor_rows)
  sigmoid_loss_against(img_emb, txt_emb, labels, pool_txt, pool_labels, log_scale, bias,
                       max_log_scale)
  total_loss(lambdas, rank, visual, textual)  (eq. 9)
One batch on one device, the same functions wrapped (for a loop of one's own, and the tests):
  instance_loss(logits, labels)
  ranking_loss(img_emb, txt_emb, margin=1.0, negatives="hardest", rng=None, labels=None,
               mined_txt_emb=None, mined_labels=None)  (ranking_loss_against, pool = batch)
  infonce_loss(img_emb, txt_emb, log_scale, labels=None)
  sigmoid_loss(img_emb, txt_emb, log_scale, bias, labels=None)
  batch_loss(outputs, labels, lambdas, margin=1.0, negatives="hardest", rng=None, ...)

Ranking conventions. Row i of `img_emb` and `txt_emb` is a positive pair. A negative of anchor i
is any item whose label differs from label i (labels default to the row index, so "any other
row"). Each anchor's hinge is max(0, margin - D(pos) + D(neg)) on cosine similarity D; an anchor
with no possible negative contributes 0. The loss is the mean over image anchors plus the mean
over text anchors.

Negative modes:
  hardest: the most similar negative in the batch, both directions (VSE++ max violation).
  random:  a uniformly random negative, both directions; needs `rng`.
  mined:   the original's mining. Image anchors take the most similar caption of a candidate
           pool (`mined_txt_emb`, labels `mined_labels`) whose features the caller computed in
           inference mode; text anchors take a random other image of the batch (needs `rng`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from instance_loss_jax.config import NEGATIVE_MODES
from instance_loss_jax.models.dual_path import l2_normalize


def instance_loss(logits, labels):
  """Mean softmax cross-entropy of W_share logits [N, C] against group ids [N]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def instance_loss_per_row(logits, labels, num_classes: int, axis_name: str | None = None):
  """Per-row softmax cross-entropy and top-1 hit of W_share logits whose classes are split
  over the devices of `axis_name` (run inside shard_map), without gathering the logits.

  logits: [N, C_local], this device's contiguous slice of the classes (device d holds classes
  d * C_local ... (d + 1) * C_local - 1); every device holds the same N rows. labels: [N] global
  class ids. Classes >= num_classes are padding: they never win and get no gradient. The
  softmax's max and sum of exponentials are completed with pmax / psum, the label's logit comes
  from the device that owns it, and the top-1 prediction is the lowest class id attaining the
  global max (argmax's choice). With axis_name=None, an ordinary softmax over all classes.

  Returns (cross_entropy [N] float32, correct [N] bool), the same on every device.
  """
  logits = logits.astype(jnp.float32)
  local = logits.shape[-1]
  offset = jax.lax.axis_index(axis_name) * local if axis_name else 0
  classes = offset + jnp.arange(local)
  logits = jnp.where(classes < num_classes, logits, -jnp.inf)
  all_max = (lambda x: jax.lax.pmax(x, axis_name)) if axis_name else (lambda x: x)
  all_sum = (lambda x: jax.lax.psum(x, axis_name)) if axis_name else (lambda x: x)
  local_max = jnp.max(logits, axis=-1)
  # The max only shifts the exponentials for stability: its gradient cancels, so none flows.
  top = all_max(jax.lax.stop_gradient(local_max))
  sum_exp = all_sum(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  is_label = classes[None, :] == labels[:, None]
  label_logit = all_sum(jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1))
  cross_entropy = jnp.log(sum_exp) + top - label_logit
  candidate = jnp.where(local_max == top, jnp.argmax(logits, axis=-1) + offset,
                        jnp.iinfo(jnp.int32).max)
  predicted = jax.lax.pmin(candidate, axis_name) if axis_name else candidate
  return cross_entropy, predicted == labels


def sample_negatives(rng, valid, row_offset=0, total_rows: int | None = None):
  """For each row of the boolean [N, M] `valid`, a uniformly random column where it is True.

  The draw for row i is that of row `row_offset + i` of a [total_rows, M] draw (default: N
  rows), so a device holding rows of a larger batch draws what one device would for them.
  Returns (indices [N], has_negative [N]); rows with no True get index 0 and False.
  """
  rows = valid.shape[0]
  uniform = jax.random.uniform(rng, (total_rows or rows, valid.shape[1]))
  if total_rows is not None and total_rows != rows:
    uniform = jax.lax.dynamic_slice_in_dim(uniform, row_offset, rows)
  scores = jnp.where(valid, uniform, -1.0)
  return jnp.argmax(scores, axis=1), jnp.any(valid, axis=1)


def _hardest(sim, valid):
  return jnp.max(jnp.where(valid, sim, -jnp.inf), axis=1), jnp.any(valid, axis=1)


def _random(rng, sim, valid, rows):
  idx, has = sample_negatives(rng, valid, *rows)
  return jnp.take_along_axis(sim, idx[:, None], axis=1)[:, 0], has


def _hinge_mean(margin, pos, neg, has_negative):
  return jnp.mean(jnp.where(has_negative, jnp.maximum(0.0, margin - pos + neg), 0.0))


def ranking_loss_against(img_emb, txt_emb, labels, pool_img, pool_txt, pool_labels,
                         margin: float = 1.0, negatives: str = "hardest", rng=None,
                         mined_txt_emb=None, mined_labels=None, anchor_rows=(0, None)):
  """`ranking_loss` with anchors (rows of img_emb/txt_emb) drawn against separate pools.

  The train step uses it with the pools = every device's batch (all-gathered), so negatives come
  from the global batch while each device keeps its own anchors. anchor_rows: (offset of these
  anchors in the global batch, global batch size), so that sampled negatives are a function of
  the anchor's global position, not of the device count.
  """
  if negatives not in NEGATIVE_MODES:
    raise ValueError(f"negatives={negatives!r}: one of {NEGATIVE_MODES}")
  if negatives in ("random", "mined") and rng is None:
    raise ValueError(f"negatives={negatives!r} needs an rng")
  if negatives == "mined" and mined_txt_emb is None:
    raise ValueError("negatives='mined' needs mined_txt_emb (candidate caption features)")
  img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
  pos = jnp.sum(img * txt, axis=-1)
  if negatives == "mined":
    cand_txt = l2_normalize(mined_txt_emb)
    cand_labels = (jnp.full(cand_txt.shape[:1], -1, labels.dtype) if mined_labels is None
                   else mined_labels)
  else:
    cand_txt, cand_labels = l2_normalize(pool_txt), pool_labels
  sim_i2t = img @ cand_txt.T
  valid_i2t = labels[:, None] != cand_labels[None, :]
  sim_t2i = txt @ l2_normalize(pool_img).T
  valid_t2i = labels[:, None] != pool_labels[None, :]
  if negatives == "hardest":
    neg_i2t, neg_t2i = _hardest(sim_i2t, valid_i2t), _hardest(sim_t2i, valid_t2i)
  elif negatives == "random":
    rng_i2t, rng_t2i = jax.random.split(rng)
    neg_i2t = _random(rng_i2t, sim_i2t, valid_i2t, anchor_rows)
    neg_t2i = _random(rng_t2i, sim_t2i, valid_t2i, anchor_rows)
  else:  # mined
    neg_i2t, neg_t2i = _hardest(sim_i2t, valid_i2t), _random(rng, sim_t2i, valid_t2i, anchor_rows)
  return _hinge_mean(margin, pos, *neg_i2t) + _hinge_mean(margin, pos, *neg_t2i)


def ranking_loss(img_emb, txt_emb, margin: float = 1.0, negatives: str = "hardest", rng=None,
                 labels=None, mined_txt_emb=None, mined_labels=None):
  """The bidirectional hinge of eq. 4 on cosine similarity (inputs normalised inside).

  img_emb, txt_emb: [N, D], row i a positive pair. labels: optional [N] group ids; rows with the
  same id are not each other's negatives. See the module docstring for `negatives`.
  """
  if labels is None:
    labels = jnp.arange(img_emb.shape[0])
  return ranking_loss_against(img_emb, txt_emb, labels, img_emb, txt_emb, labels, margin,
                              negatives, rng, mined_txt_emb, mined_labels)


def logit_scale(log_scale, max_log_scale: float | None = None):
  """exp(log_scale) in float32, log_scale clipped at max_log_scale (CLIP clips at log 100)."""
  log_scale = jnp.asarray(log_scale, jnp.float32)
  return jnp.exp(log_scale if max_log_scale is None else jnp.minimum(log_scale, max_log_scale))


def _similarities(anchors, pool):
  """anchors @ pool.T with float32 accumulation and result (the inputs may be bfloat16)."""
  return jnp.matmul(anchors, pool.T, preferred_element_type=jnp.float32)


def _anchor_columns(rows: int, pool_rows: int, anchor_rows):
  """[rows, pool_rows] bool: column j is anchor i's own pair (its global position)."""
  own = anchor_rows[0] + jnp.arange(rows)
  return jnp.arange(pool_rows)[None, :] == own[:, None]


def infonce_loss_against(img_emb, txt_emb, labels, pool_img, pool_txt, pool_labels, log_scale,
                         max_log_scale: float | None = None, anchor_rows=(0, None)):
  """CLIP's InfoNCE of these anchors against pools (the train step: the global batch), both
  directions: the mean over anchors of -log softmax_j(s * img_i . txt_j) at j = i's own pair,
  and the same from the text side, averaged. s = exp(log_scale) (a learned parameter).

  Inputs are L2-normalised rows; row i of img_emb/txt_emb is a pair, at position
  anchor_rows[0] + i of the pools. Another column with i's label (CUHK-PEDES: another image of
  the same person) is no negative: it is left out of i's softmax, which keeps i's own pair as
  the one target.
  """
  scale = logit_scale(log_scale, max_log_scale)
  own = _anchor_columns(img_emb.shape[0], pool_img.shape[0], anchor_rows)
  not_negative = (labels[:, None] == pool_labels[None, :]) & ~own

  def direction(anchors, pool):
    logits = jnp.where(not_negative, -jnp.inf, scale * _similarities(anchors, pool))
    target = jnp.sum(jnp.where(own, logits, 0.0), axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - target)

  return 0.5 * (direction(img_emb, pool_txt) + direction(txt_emb, pool_img))


def sigmoid_loss_against(img_emb, txt_emb, labels, pool_txt, pool_labels, log_scale, bias,
                         max_log_scale: float | None = None):
  """SigLIP's pairwise sigmoid loss of these image anchors against a pool of texts (the train
  step: the global batch): -(1/n) sum_j log sigmoid(z_ij * (s * img_i . txt_j + b)) summed over
  the anchors i and divided by their number n; on the mesh the mean over devices then gives
  SigLIP's -(1/N) sum_ij over the global batch of N. s = exp(log_scale) and b are learned.

  Inputs are L2-normalised rows. z_ij = +1 where txt_j has i's label (its own caption, and
  CUHK-PEDES's other captions of the same person: positives), -1 elsewhere. One sum over every
  (image, text) pair covers both directions.
  """
  logits = logit_scale(log_scale, max_log_scale) * _similarities(img_emb, pool_txt) + jnp.asarray(
      bias, jnp.float32)
  z = jnp.where(labels[:, None] == pool_labels[None, :], 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / img_emb.shape[0]


def infonce_loss(img_emb, txt_emb, log_scale, labels=None, max_log_scale: float | None = None):
  """`infonce_loss_against` of one batch against itself (labels default: the row index)."""
  labels = jnp.arange(img_emb.shape[0]) if labels is None else labels
  return infonce_loss_against(img_emb, txt_emb, labels, img_emb, txt_emb, labels, log_scale,
                              max_log_scale)


def sigmoid_loss(img_emb, txt_emb, log_scale, bias, labels=None,
                 max_log_scale: float | None = None):
  """`sigmoid_loss_against` of one batch against itself (labels default: the row index)."""
  labels = jnp.arange(img_emb.shape[0]) if labels is None else labels
  return sigmoid_loss_against(img_emb, txt_emb, labels, txt_emb, labels, log_scale, bias,
                              max_log_scale)


def total_loss(lambdas: Sequence[float], rank, visual, textual):
  """lambda1 * L_rank + lambda2 * L_visual + lambda3 * L_textual (eq. 9): the train step's
  objective, from its three terms (global means)."""
  l_rank, l_vis, l_txt = (float(x) for x in lambdas)
  return l_rank * rank + l_vis * visual + l_txt * textual


def batch_loss(outputs: dict[str, Any], labels, lambdas: Sequence[float], margin: float = 1.0,
               negatives: str = "hardest", rng=None, pool: dict[str, Any] | None = None,
               mined_txt_emb=None, mined_labels=None):
  """Eq. 9 of one batch on one device from the model's outputs: the three terms, then
  `total_loss`.

  outputs: the model's dict (img_emb, txt_emb, img_logits, txt_logits). pool: optional dict
  (img_emb, txt_emb, labels) to draw ranking negatives from; default: this batch. A zero lambda
  skips its term's computation. Returns (total, dict of the three terms).
  """
  l_rank, l_vis, l_txt = (float(x) for x in lambdas)
  zero = jnp.zeros((), jnp.float32)
  rank = zero
  if l_rank:
    pool = pool or dict(img_emb=outputs["img_emb"], txt_emb=outputs["txt_emb"], labels=labels)
    rank = ranking_loss_against(outputs["img_emb"], outputs["txt_emb"], labels,
                                pool["img_emb"], pool["txt_emb"], pool["labels"], margin,
                                negatives, rng, mined_txt_emb, mined_labels)
  visual = instance_loss(outputs["img_logits"], labels) if l_vis else zero
  textual = instance_loss(outputs["txt_logits"], labels) if l_txt else zero
  return total_loss(lambdas, rank, visual, textual), dict(rank=rank, visual=visual,
                                                          textual=textual)
