"""The train step over a device mesh: data-parallel equivalence, Stage I freezing, learning, bad
batches."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import host_train_state, Processes, random_batch, tiny_config
from instance_loss_jax import inference, sharding, training as ts
from instance_loss_jax.errors import BatchError
from instance_loss_jax.models import build_model
from instance_loss_jax.training import losses

STEPS_PER_EPOCH = 10
STAGE2 = {"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 0.5}


def run_steps(config, devices, batches, seed=0, state=None):
  if state is None:
    state = host_train_state(config, jax.random.key(seed), STEPS_PER_EPOCH)
  return helpers.run_steps(config, devices, batches, state, STEPS_PER_EPOCH)


def jit_apply(model, **kwargs):
  """model.apply with fixed keyword arguments, compiled whole: run eagerly, every primitive of
  the model would be compiled on its own (hundreds of small XLA:CPU compiles)."""
  return jax.jit(functools.partial(model.apply, **kwargs))


def assert_close_to_scale(a, b, rel, floor=1e-5):
  """Every leaf of a within rel x (the largest magnitude of b's leaf) of b's, elementwise."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.abs(x - y).max() <= rel * np.abs(y).max() + floor, jax.tree_util.keystr(path)


def assert_trees_close(a, b, **tol):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves(b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


# Each sharding of W_share and each ranking loss once (every pair: 25 s more of the suite).
@pytest.mark.parametrize("w_share_sharding,num_classes,ranking", [
    ("classes", 13, "triplet"), ("classes", 13, "infonce"), ("replicated", 16, "sigmoid")])
@pytest.mark.slow
def test_eight_devices_match_one_device(w_share_sharding, num_classes, ranking):
  # Stage II with both losses: BN statistics must be synchronised over devices (8 devices hold
  # one example each), the hardest negatives must come from the global batch of 8, and W_share's
  # 13 classes (padded to 16, 2 per device) give the softmax of all 13. Dropout on: its masks
  # follow the rows' global positions, so 8 devices draw what 1 does.
  assert jax.local_device_count() >= 8, "conftest.py forces 8 host devices"
  # InfoNCE and SigLIP: each device's rows against the all-gathered global batch, with their
  # learned temperature (and bias) among the parameters compared.
  config = tiny_config(**STAGE2, **{"model.w_share_sharding": w_share_sharding,
                                    "num_classes": num_classes, "batch_size": 8,
                                    "model.dropout": 0.5, "loss.ranking": ranking})
  batches = [random_batch(config, seed=0)]
  devices = jax.local_devices()
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  state8, hist8 = run_steps(config, devices[:8], batches, state=init)
  state1, hist1 = run_steps(config, devices[:1], batches, state=init)
  assert state8.params["w_share"]["kernel"].shape[-1] == num_classes
  # One step, compared as what it changed: the update (lr times the Nesterov-momentum
  # gradient), the BN statistics' move and the momentum (the raw gradient), each to 1e-3 of
  # its own tensor's scale, plus 1e-5 for the tensors whose gradient is zero but for rounding
  # (the word embedding's bias, before a BatchNorm: its momentum is float noise of ~1e-6). A
  # gradient off by the device count (W_share's, say) is 8x; a BN statistic of one device's
  # rows instead of the batch's is off by its whole size. One step, not two: float32 sums in
  # another order (8 devices' partial sums; and XLA:CPU vectorises for the host CPU, so the
  # order differs between Intel and AMD too) are amplified by each further large step, and two
  # steps failed on an AMD EPYC at this tolerance (a BN bias off by 5.9e-5 of 1.1e-2). One
  # step's largest relative gap here, 1.0e-5, and two steps', 1.5e-4: benchmarks/RESULTS.md
  # ("Eight devices against one"; benchmarks/device_count_spread.py).
  change = lambda new, old: jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                                   new, old)
  init_host = jax.device_get(init)
  for name in ("params", "batch_stats"):
    assert_close_to_scale(change(getattr(state8, name), getattr(init_host, name)),
                          change(getattr(state1, name), getattr(init_host, name)), 1e-3,
                          floor=1e-5)
  assert_close_to_scale(state8.opt_state, state1.opt_state, 1e-3, floor=1e-5)
  for key in ("rank_loss", "visual_loss", "textual_loss", "img_accuracy", "txt_accuracy"):
    np.testing.assert_allclose(hist8[0][key], hist1[0][key], rtol=5e-5, err_msg=key)
  assert hist1[0]["rank_loss"] > 0
  # The parameters really moved: equality is not the trivial kind.
  moved = np.abs(state1.params["w_share"]["kernel"] - init.params["w_share"]["kernel"]).max()
  assert moved > 1e-3
  if ranking != "triplet":
    assert abs(state1.params["contrastive"]["log_scale"] -
               init.params["contrastive"]["log_scale"]) > 1e-4


@pytest.mark.slow
def test_init_compiled_for_speed_draws_the_same_bits():
  # train_step.init_compiler_options compiles the random init with less LLVM optimisation on
  # CPU: the variables must be those of XLA's default compile, bit for bit, both for the plain
  # init and for the one laid out on a mesh (W_share padded from 13 classes to 14).
  config = tiny_config(num_classes=13)
  model = build_model(config)
  images = np.zeros((1, config.image_size, config.image_size, 3), np.float32)
  tokens = np.zeros((1, config.model.text.max_len), np.int32)
  key = jax.random.key(3)
  default = jax.device_get(jax.jit(lambda k: model.init(k, images, tokens, train=False))(key))
  assert ts.init_compiler_options("cpu") and ts.init_compiler_options("gpu") is None
  plain = ts.variables_of(host_train_state(config, key, STEPS_PER_EPOCH))
  on_mesh = ts.variables_of(ts.host_state(ts.create_train_state(
      config, key, STEPS_PER_EPOCH, sharding.make_mesh(jax.local_devices()[:2])), config))
  for got in (plain, on_mesh):
    flat_got = jax.tree_util.tree_leaves_with_path(jax.device_get(got))
    flat_want = jax.tree_util.tree_leaves_with_path(default)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, x), (_, y) in zip(flat_got, flat_want):
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def test_given_variables_are_not_drawn_and_the_rest_are_as_a_whole_init():
  # create_train_state(given=...) (the ported backbone and the word2vec table of a fresh Stage I)
  # returns the given leaves as given and every other leaf bit for bit as the whole init draws
  # it; with every leaf given (state_from_variables) the state is the given variables with the
  # same optimiser state. W_share is padded from 13 classes to 14 on two devices.
  config = tiny_config(num_classes=13)
  key, mesh = jax.random.key(5), sharding.make_mesh(jax.local_devices()[:2])
  whole = ts.host_state(ts.create_train_state(config, key, STEPS_PER_EPOCH, mesh), config)
  rng = np.random.default_rng(0)
  fake = lambda tree: jax.tree_util.tree_map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype), tree)
  table = fake(whole.params["text_encoder"]["word_embedding"]["embedding"])
  given = {k: {"backbone": fake(getattr(whole, k)["backbone"])}
           for k in ("params", "batch_stats")}
  given["params"]["text_encoder"] = {"word_embedding": {"embedding": table}}
  got = ts.host_state(ts.create_train_state(config, key, STEPS_PER_EPOCH, mesh, given), config)
  flat_given = dict(jax.tree_util.tree_leaves_with_path(given))
  assert len(flat_given) > 10
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ts.variables_of(got)),
                          jax.tree_util.tree_leaves(ts.variables_of(whole))):
    want = flat_given.get(path, y)
    assert np.asarray(x).tobytes() == np.asarray(want).tobytes(), jax.tree_util.keystr(path)
  for x, y in zip(jax.tree_util.tree_leaves((got.opt_state, got.step)),
                  jax.tree_util.tree_leaves((whole.opt_state, whole.step))):
    np.testing.assert_array_equal(x, y)
  loaded = ts.host_state(ts.state_from_variables(config, ts.variables_of(whole),
                                                 STEPS_PER_EPOCH, mesh), config)
  for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(whole)):
    np.testing.assert_array_equal(x, y)
  bad = {"params": {"text_encoder": {"word_embedding": {"embedding": table[:3]}}, "nope": table}}
  with pytest.raises(ValueError, match=r"params/nope: not in the model; "
                     r"params/text_encoder/word_embedding/embedding: \(3, 16\) given"):
    ts.create_train_state(config, key, STEPS_PER_EPOCH, mesh, bad)
  with pytest.raises(ValueError, match="variables missing: batch_stats/image_head/bn1/mean, "):
    ts.state_from_variables(config, given, STEPS_PER_EPOCH, mesh)


@pytest.mark.parametrize("backbone_bn", ["running", "batch"])
@pytest.mark.slow
def test_stage1_backbone_is_frozen(backbone_bn):
  config = tiny_config(**{"backbone_bn": backbone_bn})
  assert config.freeze_backbone and config.stage == 1
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  init_params, init_stats = jax.device_get((init.params, init.batch_stats))
  batches = [random_batch(config, seed=s) for s in range(3)]
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


LEARNS = {**STAGE2, "optim.lr": 1.0, "optim.lr_mult.word_embedding": 1.0}


@pytest.mark.slow
def test_both_losses_go_down_on_a_fixed_batch():
  config = tiny_config(**LEARNS)
  batch = random_batch(config, seed=0)
  _, history = run_steps(config, jax.local_devices()[:1], [batch] * 40)
  first, last = history[0], history[-1]
  for key in ("rank_loss", "visual_loss", "textual_loss"):
    assert last[key] < 0.5 * first[key], (key, first[key], last[key])
  assert last["img_accuracy"] == 1.0 and last["txt_accuracy"] == 1.0


@pytest.mark.slow
def test_step_loss_is_the_batch_loss_of_the_models_outputs():
  """One device, dropout 0: the step's loss and terms are `losses.batch_loss` (eq. 9) of the
  model's own forward pass, so the step's sharded arithmetic cannot drift from the reference.
  (The config is the test above's: its compiled step comes from the run's compile cache.)"""
  config = tiny_config(**LEARNS)
  batch = random_batch(config, seed=0)
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  _, history = run_steps(config, jax.local_devices()[:1], [batch], state=init)
  out, _ = jit_apply(build_model(config), train=True, mutable=["batch_stats"])(
      ts.variables_of(init), batch["images"], batch["tokens"])
  total, terms = losses.batch_loss(out, batch["labels"], config.loss.lambdas, config.loss.margin,
                                   config.loss.negatives)
  np.testing.assert_allclose(history[0]["loss"], total, rtol=1e-5)
  for name, value in terms.items():
    assert value > 0, name
    np.testing.assert_allclose(history[0][f"{name}_loss"], value, rtol=1e-5, err_msg=name)


# Relative tolerance of bfloat16's first-step losses against float32's from the same start.
# bfloat16 keeps 8 bits of mantissa; over 16 seeds (benchmarks/bf16_spread.py, RESULTS.md) the
# first step's gap was at most 2.0e-2 for the ranking loss (a hinge on differences of cosine
# similarities, so rounding is large against it), 1.4e-3 and 5.2e-4 for the two softmax losses,
# on jax 0.10.2 and 0.12.0.1 alike. Later steps add two trajectories' divergence (up to 13% by
# step 2): not a property of the arithmetic, so not compared.
BF16_FIRST_STEP_RTOL = {"rank_loss": 6e-2, "visual_loss": 5e-3, "textual_loss": 5e-3}


@pytest.mark.slow
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
  # compute_dtype changes the arithmetic only: the state (params, momentum, BN statistics) stays
  # float32, and one step's losses stay close to float32's from the same start.
  config = tiny_config(**STAGE2)
  batches = [random_batch(config, seed=0)]
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  devices = jax.local_devices()[:1]
  state32, hist32 = run_steps(config, devices, batches, state=init)
  bf16 = config.copy_and_resolve_references()
  bf16.compute_dtype = "bfloat16"
  state16, hist16 = run_steps(bf16, devices, batches, state=init)
  for tree in (state16.params, state16.batch_stats, state16.opt_state):
    assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} <= {np.dtype(np.float32),
                                                                  np.dtype(np.int32)}
  for key, rtol in BF16_FIRST_STEP_RTOL.items():
    np.testing.assert_allclose(hist16[0][key], hist32[0][key], rtol=rtol, err_msg=key)
  # ... and not 0 either: the arithmetic did change.
  assert not np.allclose(state16.params["text_head"]["fc1"]["kernel"],
                         state32.params["text_head"]["fc1"]["kernel"], rtol=1e-6, atol=0)
  # The activations really are bfloat16 (a float32 run would show no bf16 values).
  model = build_model(bf16)
  _, inter = jit_apply(model, capture_intermediates=True)(
      ts.variables_of(state16), batches[0]["images"], batches[0]["tokens"])
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(inter["intermediates"]["backbone"])}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_float32_parts_compute_in_float32_under_bfloat16():
  config = tiny_config(compute_dtype="bfloat16", float32_parts=("w_share", "batch_norm"))
  batch = random_batch(config)
  model = build_model(config)
  variables = ts.variables_of(host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH))
  out, inter = jit_apply(model, capture_intermediates=True)(variables, batch["images"],
                                                            batch["tokens"])
  assert out["img_logits"].dtype == jnp.float32  # W_share
  flat = jax.tree_util.tree_leaves_with_path(inter["intermediates"])
  dtypes = lambda word: {x.dtype for p, x in flat if word in jax.tree_util.keystr(p)}
  assert dtypes("bn") == {jnp.dtype(jnp.float32)}
  assert dtypes("conv") == {jnp.dtype(jnp.bfloat16)}  # the convolutions stay bfloat16


def _np_hinge(margin, pos, neg, has):
  return float(np.mean(np.where(has, np.maximum(0.0, margin - pos + neg), 0.0)))


@pytest.mark.slow
def test_mined_negatives_match_numpy_on_a_fixed_pool():
  # 8 devices, 2 anchors and 3 candidates each: the step embeds its candidates in inference mode,
  # gathers the pool, and every image anchor takes the most similar candidate of another class;
  # text anchors take a random other image (losses.sample_negatives, the step's key).
  config = tiny_config(**STAGE2, **{"loss.negatives": "mined", "loss.num_mined": 24,
                                    "batch_size": 16})
  batch = random_batch(config, seed=0)
  rng = np.random.default_rng(1)
  batch["mined_tokens"] = rng.integers(1, 40, (24, 8)).astype(np.int32)
  # Half of the candidates are captions of the batch's own classes: never their negatives.
  batch["mined_labels"] = np.concatenate([batch["labels"][:12], rng.integers(0, 16, 12)]).astype(
      np.int32)
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  _, history = run_steps(config, jax.local_devices()[:8], [batch], state=init)

  model = build_model(config)
  variables = ts.variables_of(init)
  out, _ = jit_apply(model, train=True, mutable=["batch_stats"], method="encode")(
      variables, batch["images"], batch["tokens"])
  img, txt = np.asarray(out["img_emb"], np.float64), np.asarray(out["txt_emb"], np.float64)
  labels, pos = batch["labels"], np.sum(img * txt, axis=1)

  def reference(candidates_train_mode: bool) -> float:
    cand = jit_apply(model, train=candidates_train_mode, method="text_embedding",
                     mutable=["batch_stats"])(variables, batch["mined_tokens"])[0]
    sim = img @ np.asarray(cand, np.float64).T
    valid = labels[:, None] != batch["mined_labels"][None, :]
    chosen = np.array([max(np.flatnonzero(v), key=lambda j, s=s: s[j])
                       for s, v in zip(sim, valid)])
    i2t = _np_hinge(1.0, pos, sim[np.arange(16), chosen], valid.any(axis=1))
    key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))[1]
    others = labels[:, None] != labels[None, :]
    idx = np.asarray(losses.sample_negatives(key, others)[0])
    t2i = _np_hinge(1.0, pos, (txt @ img.T)[np.arange(16), idx], others.any(axis=1))
    return i2t + t2i

  np.testing.assert_allclose(history[0]["rank_loss"], reference(False), rtol=1e-5)
  # The check can tell: candidates embedded in training mode give another loss.
  assert abs(reference(True) - reference(False)) > 1e-3


@pytest.mark.parametrize("features", ["after_relu", "original"])
def test_embed_fns_give_unit_vectors_and_flip_average(features):
  config = tiny_config(**{"eval.features": features, "eval.batch_size": 7})
  state = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  mesh = sharding.make_mesh(jax.local_devices()[:2])
  fns = inference.make_embed_fns(config, mesh)
  embed_images, embed_texts = fns.images, fns.texts
  assert fns.mesh is mesh and fns.rows == 6  # eval.batch_size down to a multiple of 2 devices
  host_variables = jax.device_get(ts.variables_of(state))
  variables = fns.place(host_variables)
  assert sharding.W_SHARE not in variables["params"]  # the embedders do not use it
  batch = random_batch(config)
  plain = np.asarray(embed_images(variables, batch["images"], False))
  averaged = np.asarray(embed_images(variables, batch["images"], True))
  texts = np.asarray(embed_texts(variables, batch["tokens"]))
  assert plain.shape == (8, 32) and texts.shape == (8, 32)
  np.testing.assert_allclose(np.linalg.norm(averaged, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(texts, axis=-1), 1.0, rtol=1e-5)
  # The image and its mirror: normalised views summed (after_relu), or the raw BatchNorm
  # outputs before the last ReLU summed (original); then normalised.
  model = build_model(config)
  apply = jit_apply(model, final_relu=features != "original", method="image_features")
  view = lambda x: np.asarray(apply(host_variables, x), np.float64)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a, b = view(batch["images"]), view(batch["images"][:, :, ::-1])
  total = unit(a) + unit(b) if features == "after_relu" else a + b
  assert (features == "original") == bool((a < 0).any())
  np.testing.assert_allclose(averaged, unit(total), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def frozen_step():
  config = tiny_config()
  return config, ts.make_train_step(config, STEPS_PER_EPOCH,
                                    sharding.make_mesh(jax.local_devices()[:2]))


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b.update(images=b["images"][:, :16]), r"'images' has shape \(8, 16, 32, 3\)"),
    (lambda b: b.update(tokens=b["tokens"][..., :5]), r"'tokens'.*\(model.text.max_len=8\)"),
    (lambda b: b.update(labels=b["labels"].astype(np.float32)), "'labels' has dtype float32"),
    (lambda b: b.pop("labels"), "missing 'labels'"),
    (lambda b: b.update(labels=b["labels"] + 100), r"'labels' values span .*\(num_classes\)"),
    (lambda b: b.update(tokens=b["tokens"] + 100), r"model.text.vocab_size"),
])
def test_bad_batches_are_named_before_compiling(frozen_step, mutate, message):
  config, step = frozen_step
  batch = random_batch(config)
  mutate(batch)
  with pytest.raises(BatchError, match=message):
    step(None, batch)  # the check runs first: no state, nothing traced or compiled


def test_batch_that_does_not_divide_over_the_devices():
  config = tiny_config(batch_size=6)
  step = ts.make_train_step(config, STEPS_PER_EPOCH, sharding.make_mesh(jax.local_devices()[:4]))
  with pytest.raises(BatchError, match="batch_size=6 is not divisible by 4 devices"):
    step(None, random_batch(config))


MULTIPROCESS = {**STAGE2, "num_classes": 13, "model.dropout": 0.5}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices (jax.distributed over gloo) = this process with 4 devices:
  global arrays assembled from each process's rows, W_share's 13 classes split over 4 devices
  of two processes, Orbax not involved."""
  import sys
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
  workers = Processes(lambda i, port: [sys.executable, worker, port, str(i), "2", "2",
                                       str(tmp_path / "two.npz")], 2, tmp_path)
  # The reference: the worker's config and batches, one process, 4 devices.
  config = tiny_config(**MULTIPROCESS)
  state, _ = run_steps(config, jax.local_devices()[:4],
                       [random_batch(config, seed=s) for s in range(2)])
  outs = [out for out, _ in workers.wait()]
  # The job is one writer: process 0's claim, seen by both; a workdir held by another job is
  # refused on both processes.
  claims = [line.split() for out in outs for line in out.splitlines() if line.startswith("claim")]
  assert len(claims) == 2 and {c[3] for c in claims} == {claims[0][2]}, outs
  refused = [line for out in outs for line in out.splitlines() if line.startswith("refused")]
  assert len(refused) == 2 and all("host another-host, pid 1" in r for r in refused), outs
  two = np.load(tmp_path / "two.npz")
  one = {jax.tree_util.keystr(p): x for p, x in
         jax.tree_util.tree_leaves_with_path(ts.variables_of(state))}
  assert sorted(two.files) == sorted(one) and len(one) > 50
  # Sums over devices and processes add in another order: ~1e-6 apart after 2 steps. (Not more
  # steps: at lr 0.5 such differences grow until a hardest-negative argmax flips.)
  for key in two.files:
    np.testing.assert_allclose(two[key], one[key], rtol=2e-4, atol=2e-5, err_msg=key)
