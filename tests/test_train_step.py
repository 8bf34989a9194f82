"""The pmapped train step: data-parallel equivalence, Stage I freezing, learning, bad batches."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_batch, tiny_config
from instance_loss_jax import train_step as ts

STEPS_PER_EPOCH = 10


def run_steps(config, devices, batches, seed=0, state=None):
  if state is None:
    state = ts.create_train_state(config, jax.random.key(seed), STEPS_PER_EPOCH)
  step = ts.make_train_step(config, STEPS_PER_EPOCH, devices)
  state = ts.replicate(state, devices)
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(ts.unreplicate(metrics))
  return ts.unreplicate(state), history


def regroup(batch, num_devices):
  """The same global batch laid out over another number of devices."""
  return {k: v.reshape((num_devices, -1) + v.shape[2:]) for k, v in batch.items()}


def assert_trees_close(a, b, **tol):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves(b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


def test_eight_devices_match_one_device():
  # Stage II with both losses: BN statistics must be synchronised over devices (8 devices hold
  # one example each) and the hardest negatives must come from the global batch of 8.
  assert jax.local_device_count() >= 8, "conftest.py forces 8 host devices"
  config = tiny_config(**{"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
                          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 0.5})
  batches = [random_batch(config, 8, seed=s) for s in range(2)]
  devices = jax.local_devices()
  init = ts.create_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  state8, hist8 = run_steps(config, devices[:8], batches, state=init)
  state1, hist1 = run_steps(config, devices[:1], [regroup(b, 1) for b in batches], state=init)
  # float32 sums in another order: agreement to ~1e-5 relative after two large steps.
  assert_trees_close(state8.params, state1.params, rtol=2e-4, atol=2e-5)
  assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=2e-4, atol=2e-5)
  for m8, m1 in zip(hist8, hist1):
    for key in ("rank_loss", "visual_loss", "textual_loss"):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
  assert hist1[0]["rank_loss"] > 0
  # The parameters really moved: equality is not the trivial kind.
  moved = np.abs(state1.params["w_share"]["kernel"] - init.params["w_share"]["kernel"]).max()
  assert moved > 1e-3


@pytest.mark.parametrize("backbone_bn", ["running", "batch"])
def test_stage1_backbone_is_frozen(backbone_bn):
  config = tiny_config(**{"backbone_bn": backbone_bn})
  assert config.freeze_backbone and config.stage == 1
  init = ts.create_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  init_params, init_stats = ts.unreplicate(ts.replicate((init.params, init.batch_stats)))
  batches = [random_batch(config, 2, seed=s) for s in range(3)]
  state, _ = run_steps(config, jax.local_devices()[:2], batches, state=init)
  for a, b in zip(jax.tree_util.tree_leaves(init_params["backbone"]),
                  jax.tree_util.tree_leaves(state.params["backbone"])):
    assert a.tobytes() == b.tobytes()
  for a, b in zip(jax.tree_util.tree_leaves(init_stats["backbone"]),
                  jax.tree_util.tree_leaves(state.batch_stats["backbone"])):
    assert a.tobytes() == b.tobytes()
  for name in ("text_encoder", "image_head", "text_head", "w_share"):
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(init_params[name]),
        jax.tree_util.tree_leaves(state.params[name]))]
    assert all(changed), f"{name}: some parameters did not train"
  text_stats_changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(init_stats["text_encoder"]),
      jax.tree_util.tree_leaves(state.batch_stats["text_encoder"]))]
  assert all(text_stats_changed)


def test_both_losses_go_down_on_a_fixed_batch():
  config = tiny_config(**{"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
                          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 1.0,
                          "optim.lr_mult.word_embedding": 1.0})
  batch = random_batch(config, 1, seed=0)
  _, history = run_steps(config, jax.local_devices()[:1], [batch] * 40)
  first, last = history[0], history[-1]
  for key in ("rank_loss", "visual_loss", "textual_loss"):
    assert last[key] < 0.5 * first[key], (key, first[key], last[key])
  assert last["img_accuracy"] == 1.0 and last["txt_accuracy"] == 1.0


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
  # compute_dtype changes the arithmetic only: the state (params, momentum, BN statistics) stays
  # float32, and the step's losses stay close to float32's from the same start.
  config = tiny_config(**{"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
                          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 0.5})
  batches = [random_batch(config, 1, seed=s) for s in range(3)]
  init = ts.create_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  devices = jax.local_devices()[:1]
  state32, hist32 = run_steps(config, devices, batches, state=init)
  bf16 = config.copy_and_resolve_references()
  bf16.compute_dtype = "bfloat16"
  state16, hist16 = run_steps(bf16, devices, batches, state=init)
  for tree in (state16.params, state16.batch_stats, state16.opt_state):
    assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} <= {np.dtype(np.float32),
                                                                  np.dtype(np.int32)}
  # bfloat16 keeps 8 bits of mantissa: ~1% on a loss, not 1e-6.
  for m16, m32 in zip(hist16, hist32):
    for key in ("rank_loss", "visual_loss", "textual_loss"):
      np.testing.assert_allclose(m16[key], m32[key], rtol=5e-2, err_msg=key)
  # ... and not 0 either: the arithmetic did change.
  assert not np.allclose(state16.params["text_head"]["fc1"]["kernel"],
                         state32.params["text_head"]["fc1"]["kernel"], rtol=1e-6, atol=0)
  # The activations really are bfloat16 (a float32 run would show no bf16 values).
  model = ts.build_model(bf16)
  _, inter = model.apply(ts.variables_of(state16), batches[0]["images"][0],
                         batches[0]["tokens"][0], capture_intermediates=True)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(inter["intermediates"]["backbone"])}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_mined_negatives_run_in_the_step():
  # ("random" differs from "hardest" only inside losses.ranking_loss_against, tested there.)
  for mode in ("mined",):
    config = tiny_config(**{"loss.lambdas": (1.0, 1.0, 1.0), "loss.negatives": mode,
                            "loss.num_mined": 16})
    batch = random_batch(config, 2, seed=0)
    rng = np.random.default_rng(1)
    batch["mined_tokens"] = rng.integers(1, 40, (2, 8, 8)).astype(np.int32)
    batch["mined_labels"] = rng.integers(0, 16, (2, 8)).astype(np.int32)
    _, history = run_steps(config, jax.local_devices()[:2], [batch])
    assert np.isfinite(history[0]["loss"]) and history[0]["rank_loss"] > 0


def test_embed_fns_give_unit_vectors_and_flip_average():
  config = tiny_config()
  state = ts.create_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  devices = jax.local_devices()[:2]
  embed_images, embed_texts = ts.make_embed_fns(config, devices)
  variables = ts.replicate(ts.variables_of(state), devices)
  batch = random_batch(config, 2)
  plain = np.asarray(embed_images(variables, batch["images"], False))
  flipped = np.asarray(embed_images(variables, batch["images"][:, :, :, ::-1], False))
  averaged = np.asarray(embed_images(variables, batch["images"], True))
  texts = np.asarray(embed_texts(variables, batch["tokens"]))
  assert plain.shape == (2, 4, 32) and texts.shape == (2, 4, 32)
  np.testing.assert_allclose(np.linalg.norm(averaged, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(texts, axis=-1), 1.0, rtol=1e-5)
  mean = plain + flipped
  np.testing.assert_allclose(averaged, mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def frozen_step():
  config = tiny_config()
  return config, ts.make_train_step(config, STEPS_PER_EPOCH, jax.local_devices()[:2])


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b.update(images=b["images"][:, :, :16]), r"'images' has shape \(2, 4, 16, 32, 3\)"),
    (lambda b: b.update(tokens=b["tokens"][..., :5]), r"'tokens'.*\(model.text.max_len=8\)"),
    (lambda b: b.update(labels=b["labels"].astype(np.float32)), "'labels' has dtype float32"),
    (lambda b: b.pop("labels"), "missing 'labels'"),
    (lambda b: b.update(labels=b["labels"] + 100), r"'labels' values span .*\(num_classes\)"),
    (lambda b: b.update(tokens=b["tokens"] + 100), r"model.text.vocab_size"),
])
def test_bad_batches_are_named_before_compiling(frozen_step, mutate, message):
  config, step = frozen_step
  batch = random_batch(config, 2)
  mutate(batch)
  with pytest.raises(ts.BatchError, match=message):
    step(None, batch)  # the check runs first: no state, nothing traced or compiled


def test_batch_laid_out_for_other_device_count(frozen_step):
  config, step = frozen_step
  with pytest.raises(ts.BatchError, match=r"expected \(2, 4, 32, 32, 3\)"):
    step(None, random_batch(config, 4))


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices (jax.distributed over gloo) = this process with 4 devices."""
  import socket
  import subprocess
  import sys
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workers = [subprocess.Popen([sys.executable, worker, port, str(i), "2", "2",
                               str(tmp_path / "two.npz")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  # The reference: the worker's config and batches, one process, 4 devices.
  config = tiny_config(**{"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
                          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 0.5})
  state, _ = run_steps(config, jax.local_devices()[:4],
                       [random_batch(config, 4, seed=s) for s in range(2)])
  for p in workers:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  two = np.load(tmp_path / "two.npz")
  one = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  assert sorted(two.files) == sorted(one) and len(one) > 50
  # Sums over devices and processes add in another order: ~1e-6 apart after 2 steps. (Not more
  # steps: at lr 0.5 such differences grow until a hardest-negative argmax flips.)
  for key in two.files:
    np.testing.assert_allclose(two[key], one[key], rtol=2e-4, atol=2e-5, err_msg=key)
