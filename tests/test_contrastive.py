"""CLIP's InfoNCE and SigLIP's sigmoid loss (training/losses.py) against numpy written from the
papers' formulas: values, gradients by finite differences (the temperature's and the bias's
included), rows that share a label, and the mesh's split into anchors and the global batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instance_loss_jax.training import losses


def unit_rows(rng, n, d=6):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_infonce(img, txt, log_scale, labels=None):
  """CLIP: the mean of the two directions' cross-entropy, target on the diagonal; another row
  of the same label is left out of the softmax."""
  n = len(img)
  labels = np.arange(n) if labels is None else np.asarray(labels)
  s = math.exp(log_scale)
  total = 0.0
  for a, b in ((img, txt), (txt, img)):
    for i in range(n):
      cols = [j for j in range(n) if j == i or labels[j] != labels[i]]
      logits = np.array([s * a[i] @ b[j] for j in cols])
      total += (np.log(np.sum(np.exp(logits))) - s * a[i] @ b[i]) / n
  return total / 2


def numpy_sigmoid(img, txt, log_scale, bias, labels=None):
  """SigLIP: -(1/n) sum_ij log sigmoid(z_ij (s img_i . txt_j + b)), z = +1 for a pair of one
  label."""
  n = len(img)
  labels = np.arange(n) if labels is None else np.asarray(labels)
  s, total = math.exp(log_scale), 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if labels[i] == labels[j] else -1.0
      total -= math.log(1 / (1 + math.exp(-z * (s * img[i] @ txt[j] + bias))))
  return total / n


CASES = {
    "infonce": (lambda img, txt, p, labels: losses.infonce_loss(img, txt, p[0], labels),
                lambda img, txt, p, labels: numpy_infonce(img, txt, p[0], labels), [2.659]),
    "sigmoid": (lambda img, txt, p, labels: losses.sigmoid_loss(img, txt, p[0], p[1], labels),
                lambda img, txt, p, labels: numpy_sigmoid(img, txt, p[0], p[1], labels),
                [2.303, -10.0]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 3, 1]], ids=["pairs", "shared"])
def test_value_and_gradients_match_numpy(name, labels):
  ours, reference, params = CASES[name]
  rng = np.random.default_rng(0)
  img, txt = unit_rows(rng, 6), unit_rows(rng, 6)
  params = np.array(params, np.float64) + rng.normal(0, 0.3, len(params))
  lab = None if labels is None else jnp.array(labels)
  value = ours(jnp.float32(img), jnp.float32(txt), jnp.float32(params), lab)
  assert float(value) == pytest.approx(reference(img, txt, params, labels), rel=1e-5)
  grads = jax.grad(lambda i, t, p: ours(i, t, p, lab), argnums=(0, 1, 2))(
      jnp.float32(img), jnp.float32(txt), jnp.float32(params))
  eps = 1e-6
  for k, x in enumerate((img, txt, params)):  # central differences of the numpy formula
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      hi, lo = [a.copy() for a in (img, txt, params)], [a.copy() for a in (img, txt, params)]
      hi[k][idx] += eps
      lo[k][idx] -= eps
      numeric[idx] = (reference(*hi, labels) - reference(*lo, labels)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads[k]), numeric, rtol=2e-3, atol=2e-4,
                               err_msg=f"{name}: gradient {k}")


def test_a_shared_label_flips_exactly_its_pairs():
  # Rows 0 and 2 share a label. SigLIP: the two cross pairs (0, 2) and (2, 0) turn from negatives
  # (z = -1) into positives (z = +1), nothing else changes. InfoNCE: row 2 leaves row 0's
  # softmax and row 0 row 2's, in both directions: the loss can only drop.
  rng = np.random.default_rng(1)
  img, txt = jnp.float32(unit_rows(rng, 4)), jnp.float32(unit_rows(rng, 4))
  shared, distinct = jnp.array([7, 1, 7, 3]), jnp.array([7, 1, 8, 3])
  s, b = 2.0, -1.0
  logit = lambda i, j: math.exp(s) * float(img[i] @ txt[j]) + b
  log_sig = lambda x: -math.log1p(math.exp(-x))
  flip = sum(log_sig(-logit(i, j)) - log_sig(logit(i, j)) for i, j in ((0, 2), (2, 0))) / 4
  got = losses.sigmoid_loss(img, txt, s, b, shared) - losses.sigmoid_loss(img, txt, s, b, distinct)
  assert float(got) == pytest.approx(flip, rel=1e-4)
  assert float(losses.infonce_loss(img, txt, s, shared)) < float(
      losses.infonce_loss(img, txt, s, distinct))


def test_the_logit_scale_is_clipped():
  rng = np.random.default_rng(2)
  img, txt = jnp.float32(unit_rows(rng, 5)), jnp.float32(unit_rows(rng, 5))
  clipped = losses.infonce_loss(img, txt, 6.0, max_log_scale=math.log(100))
  assert float(clipped) == pytest.approx(float(losses.infonce_loss(img, txt, math.log(100))))
  assert float(jax.grad(lambda s: losses.infonce_loss(img, txt, s, max_log_scale=4.6))(6.0)) == 0


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_split_into_devices_the_loss_and_gradients_are_those_of_one(name):
  # Each device's rows against the all-gathered global batch, averaged over devices: the same
  # value and gradients (embeddings, temperature, bias) as the whole batch on one device.
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:4]
  assert len(devices) == 4
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  rng = np.random.default_rng(3)
  img, txt = jnp.float32(unit_rows(rng, 8)), jnp.float32(unit_rows(rng, 8))
  labels = jnp.array([0, 1, 2, 0, 3, 4, 5, 3])
  params = jnp.float32([2.0, -3.0])

  def one(i, t, p):
    if name == "infonce":
      return losses.infonce_loss(i, t, p[0], labels)
    return losses.sigmoid_loss(i, t, p[0], p[1], labels)

  def per_device(i, t, lab, p):
    gather = lambda x: jax.lax.all_gather(x, "batch", axis=0, tiled=True)
    offset = jax.lax.axis_index("batch") * i.shape[0]
    if name == "infonce":
      local = losses.infonce_loss_against(i, t, lab, gather(i), gather(t), gather(lab), p[0],
                                          anchor_rows=(offset, 8))
    else:
      local = losses.sigmoid_loss_against(i, t, lab, gather(t), gather(lab), p[0], p[1])
    return jax.lax.pmean(local, "batch")

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch"),
                                                           P()), out_specs=P())
  split = lambda i, t, p: sharded(i, t, labels, p)
  want, want_grads = jax.value_and_grad(one, argnums=(0, 1, 2))(img, txt, params)
  got, got_grads = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))(img, txt, params)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_bfloat16_rows_give_float32_logits(name):
  # compute_dtype=bfloat16: the similarities accumulate and the softmax / log-sigmoid reduce in
  # float32, so the loss is that of the bfloat16-rounded rows computed in float32.
  rng = np.random.default_rng(4)
  img, txt = jnp.bfloat16(unit_rows(rng, 16, 32)), jnp.bfloat16(unit_rows(rng, 16, 32))
  ours = CASES[name][0]
  params = jnp.float32(CASES[name][2])
  low = ours(img, txt, params, None)
  assert low.dtype == jnp.float32
  exact = ours(jnp.float32(img), jnp.float32(txt), params, None)
  assert float(low) == pytest.approx(float(exact), rel=1e-6)
