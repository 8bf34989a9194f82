"""The losses against plain numpy loops written from the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instance_loss_jax.training import losses


def np_normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_instance_loss(logits, labels):
  total = 0.0
  for row, label in zip(logits.astype(np.float64), labels):
    total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[label]
  return total / len(labels)


def np_ranking_loss(img, txt, labels, margin, pick_i2t, pick_t2i, cand_txt=None,
                    cand_labels=None):
  """Eq. 4 with loops. pick_*(anchor, candidate sims, valid ids) returns the negative's id."""
  img, txt = np_normalize(img.astype(np.float64)), np_normalize(txt.astype(np.float64))
  if cand_txt is None:
    cand_txt, cand_labels = txt, labels
  cand_txt = np_normalize(cand_txt.astype(np.float64))
  n = len(img)
  i2t = t2i = 0.0
  for a in range(n):
    pos = img[a] @ txt[a]
    ids = [j for j in range(len(cand_txt)) if cand_labels[j] != labels[a]]
    if ids:
      sims = {j: img[a] @ cand_txt[j] for j in ids}
      i2t += max(0.0, margin - pos + sims[pick_i2t(a, sims, ids)])
    ids = [j for j in range(n) if labels[j] != labels[a]]
    if ids:
      sims = {j: txt[a] @ img[j] for j in ids}
      t2i += max(0.0, margin - pos + sims[pick_t2i(a, sims, ids)])
  return i2t / n + t2i / n


def hardest(_, sims, ids):
  return max(ids, key=lambda j: sims[j])


@pytest.mark.parametrize("n,c", [(1, 3), (7, 5), (16, 40)])
def test_instance_loss_matches_numpy(n, c):
  rng = np.random.default_rng(n)
  logits = rng.normal(size=(n, c)).astype(np.float32) * 3
  labels = rng.integers(0, c, n)
  got = losses.instance_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, np_instance_loss(logits, labels), rtol=1e-5)


@pytest.mark.parametrize("n,dim,margin", [(1, 4, 1.0), (2, 3, 1.0), (9, 8, 0.2), (32, 16, 1.0)])
def test_hardest_matches_numpy(n, dim, margin):
  rng = np.random.default_rng(n)
  img, txt = rng.normal(size=(2, n, dim)).astype(np.float32)
  got = losses.ranking_loss(img, txt, margin=margin, negatives="hardest")
  want = np_ranking_loss(img, txt, np.arange(n), margin, hardest, hardest)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hardest_with_ties_and_shared_labels():
  # Quantised embeddings make many similarities equal; labels shared by several rows (several
  # images of one person, as on CUHK-PEDES) must not be each other's negatives.
  rng = np.random.default_rng(0)
  img = rng.integers(-1, 2, (12, 3)).astype(np.float32)
  img[img.sum(1) == 0] = 1.0
  txt = img.copy()
  txt[::3] = img[1::3]  # duplicated rows: exact ties in similarity
  labels = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
  got = losses.ranking_loss(img, txt, negatives="hardest", labels=jnp.asarray(labels))
  want = np_ranking_loss(img, txt, labels, 1.0, hardest, hardest)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_single_pair_has_no_negative():
  img = np.ones((1, 4), np.float32)
  for mode in losses.NEGATIVE_MODES:
    kwargs = dict(rng=jax.random.key(0))
    if mode == "mined":
      kwargs.update(mined_txt_emb=img, mined_labels=jnp.zeros(1, jnp.int32))
    assert float(losses.ranking_loss(img, -img, negatives=mode, **kwargs)) == 0.0


def test_sample_negatives_uniform_over_valid():
  valid = np.array([[False, True, True, False, True],
                    [True, False, False, False, False],
                    [False, False, False, False, False]])
  counts = np.zeros(valid.shape)
  for seed in range(600):
    idx, has = losses.sample_negatives(jax.random.key(seed), jnp.asarray(valid))
    counts[np.arange(3), np.asarray(idx)] += 1
    np.testing.assert_array_equal(has, [True, True, False])
  assert counts[0][~valid[0]].sum() == 0 and counts[1][1:].sum() == 0
  # Each of the 3 valid ids of row 0 gets 1/3 of the draws: within 5 standard deviations.
  np.testing.assert_allclose(counts[0][valid[0]], 200, atol=5 * np.sqrt(600 * 2 / 9))


@pytest.mark.parametrize("n", [2, 10])
def test_random_matches_numpy_with_the_sampled_negatives(n):
  rng = np.random.default_rng(n)
  img, txt = rng.normal(size=(2, n, 6)).astype(np.float32)
  key = jax.random.key(3)
  got = losses.ranking_loss(img, txt, negatives="random", rng=key)
  # The same draws the loss makes: one split per direction, then a uniform valid id per row.
  off_diagonal = ~np.eye(n, dtype=bool)
  key_i2t, key_t2i = jax.random.split(key)
  idx_i2t = np.asarray(losses.sample_negatives(key_i2t, off_diagonal)[0])
  idx_t2i = np.asarray(losses.sample_negatives(key_t2i, off_diagonal)[0])
  want = np_ranking_loss(img, txt, np.arange(n), 1.0, lambda a, s, i: idx_i2t[a],
                         lambda a, s, i: idx_t2i[a])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mined_matches_numpy():
  rng = np.random.default_rng(5)
  n, k = 6, 20
  img, txt = rng.normal(size=(2, n, 8)).astype(np.float32)
  cand = rng.normal(size=(k, 8)).astype(np.float32)
  cand_labels = rng.integers(0, n + 3, k)  # some candidates are the anchors' own captions
  key = jax.random.key(1)
  got = losses.ranking_loss(img, txt, negatives="mined", rng=key, mined_txt_emb=cand,
                            mined_labels=jnp.asarray(cand_labels))
  idx_t2i = np.asarray(losses.sample_negatives(key, ~np.eye(n, dtype=bool))[0])
  want = np_ranking_loss(img, txt, np.arange(n), 1.0, hardest, lambda a, s, i: idx_t2i[a],
                         cand_txt=cand, cand_labels=cand_labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_inputs_are_normalised_inside():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(2, 5, 4)).astype(np.float32)
  a = losses.ranking_loss(img, txt)
  b = losses.ranking_loss(img * 7.0, txt * 0.1)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_total_loss_is_eq_9():
  # What the train step calls with its three global terms.
  total = losses.total_loss((2.0, 1.0, 0.5), jnp.float32(0.3), jnp.float32(4.0), jnp.float32(6.0))
  np.testing.assert_allclose(total, 2.0 * 0.3 + 1.0 * 4.0 + 0.5 * 6.0, rtol=1e-6)


def test_batch_loss_weights_terms():
  rng = np.random.default_rng(0)
  outputs = dict(img_emb=rng.normal(size=(4, 3)), txt_emb=rng.normal(size=(4, 3)),
                 img_logits=rng.normal(size=(4, 6)), txt_logits=rng.normal(size=(4, 6)))
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
  labels = jnp.arange(4)
  total, terms = losses.batch_loss(outputs, labels, (2.0, 1.0, 0.5))
  want = (2.0 * np_ranking_loss(np.asarray(outputs["img_emb"]), np.asarray(outputs["txt_emb"]),
                                np.arange(4), 1.0, hardest, hardest)
          + np_instance_loss(np.asarray(outputs["img_logits"]), np.arange(4))
          + 0.5 * np_instance_loss(np.asarray(outputs["txt_logits"]), np.arange(4)))
  np.testing.assert_allclose(total, want, rtol=1e-5)
  _, terms = losses.batch_loss(outputs, labels, (0.0, 1.0, 1.0))
  assert float(terms["rank"]) == 0.0  # skipped when its lambda is zero


def test_bad_arguments_are_named():
  x = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match="negatives='nearest'"):
    losses.ranking_loss(x, x, negatives="nearest")
  with pytest.raises(ValueError, match="needs an rng"):
    losses.ranking_loss(x, x, negatives="random")
  with pytest.raises(ValueError, match="mined_txt_emb"):
    losses.ranking_loss(x, x, negatives="mined", rng=jax.random.key(0))


def test_instance_loss_per_row_split_over_classes_and_its_gradient_equal_numpy():
  # 13 classes padded to 16 over 8 devices (2 each; the last device holds 1 real class and 1
  # padded, the one before it 2 real). Rows are split over the devices and all-gathered, as in
  # the train step; the loss is the mean over the 8 rows of the full 13-way softmax.
  from instance_loss_jax import sharding
  mesh = sharding.make_mesh(jax.devices()[:8])
  rng = np.random.default_rng(0)
  n, d, c, c_pad = 8, 5, 13, 16
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = np.zeros((d, c_pad), np.float32)
  w[:, :c] = rng.normal(size=(d, c))
  labels = rng.integers(0, c, n).astype(np.int32)
  labels[0] = c - 1  # a class on the device that also holds padding

  def per_device(x, w, labels):
    x, labels = (jax.lax.all_gather(v, sharding.AXIS, axis=0, tiled=True) for v in (x, labels))
    ce, correct = losses.instance_loss_per_row(x @ w, labels, c, sharding.AXIS)
    return jnp.mean(ce), jax.lax.pmean(jnp.mean(correct), sharding.AXIS)

  spec = jax.sharding.PartitionSpec
  fn = jax.shard_map(per_device, mesh=mesh,
                     in_specs=(spec(sharding.AXIS), spec(None, sharding.AXIS), spec(sharding.AXIS)),
                     out_specs=(spec(), spec()))
  (loss, accuracy), (grad_x, grad_w) = jax.jit(jax.value_and_grad(
      lambda x, w: fn(x, w, labels), argnums=(0, 1), has_aux=True))(x, w)

  logits = x.astype(np.float64) @ w[:, :c]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(c)[labels]
  np.testing.assert_allclose(loss, -np.mean(np.log(p[np.arange(n), labels])), rtol=1e-5)
  # d mean CE / d logits = (softmax - onehot) / n; then through logits = x @ W.
  dlogits = (p - onehot) / n
  np.testing.assert_allclose(grad_w[:, :c], x.T @ dlogits, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grad_w[:, c:], 0.0)  # padded classes get no gradient
  np.testing.assert_allclose(grad_x, dlogits @ w[:, :c].T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(accuracy, np.mean(logits.argmax(1) == labels))


def test_class_sharded_top1_breaks_ties_like_argmax():
  from instance_loss_jax import sharding
  mesh = sharding.make_mesh(jax.devices()[:4])
  logits = np.zeros((3, 8), np.float32)
  logits[0, [1, 6]] = 5.0  # tie across devices: argmax takes class 1
  logits[1, [5, 6]] = 5.0  # tie on one device: class 5
  logits[2, 7] = 9.0  # a padded class (num_classes=7) never wins: argmax over 0..6 is 0
  labels = np.array([1, 5, 0], np.int32)
  spec = jax.sharding.PartitionSpec
  fn = jax.shard_map(lambda l: losses.instance_loss_per_row(l, labels, 7, sharding.AXIS)[1],
                     mesh=mesh, in_specs=spec(None, sharding.AXIS), out_specs=spec(),
                     check_vma=False)
  np.testing.assert_array_equal(jax.jit(fn)(logits), [True, True, True])
