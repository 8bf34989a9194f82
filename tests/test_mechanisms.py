"""The paper's mechanisms, one unit test each, against references written here from the paper
and the authors' code (numpy, counts, hand-made embeddings with known answers): each test names
the bug it is there to catch."""

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from instance_loss_jax import config as config_lib
from instance_loss_jax.evaluation import evaluator
from instance_loss_jax.models import build_model, dropout_mask
from instance_loss_jax.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the two stages

# The paper, Section 4.2 and eq. 9, as this project reads it (docs/design.md, Training): Stage I
# freezes the ImageNet backbone, weights and BN statistics, and trains with instance loss only;
# Stage II trains everything, its BN statistics included, and adds the ranking loss.
PAPER_STAGES = {
    1: dict(lambdas=(0.0, 1.0, 1.0), freeze_backbone=True, backbone_bn="running",
            frozen=("backbone",)),
    2: dict(lambdas=(1.0, 1.0, 1.0), freeze_backbone=False, backbone_bn="train", frozen=()),
}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("path", ["flickr30k", "mscoco", "cuhk_pedes", "demo"])
def test_each_configs_stages_are_the_papers(path, stage):
  """Catches: Stage II's lambdas (0, 1, 1), Stage I's (1, 1, 1), a stage that freezes the wrong
  part or normalises the backbone with the wrong statistics, in any shipped config."""
  config = config_lib.load_config(os.path.join(ROOT, "configs", f"{path}.py:stage{stage}"))
  want = PAPER_STAGES[stage]
  assert config.stage == stage
  assert tuple(config.loss.lambdas) == want["lambdas"]
  assert config.freeze_backbone is want["freeze_backbone"]
  assert config.backbone_bn == want["backbone_bn"]
  assert config_lib.frozen_scopes(config) == want["frozen"]
  config_lib.validate_config(config)


# ------------------------------------------------------------------------- learning-rate groups

# Which group each top-level scope's parameters belong to (docs/design.md, Training).
GROUP_OF_SCOPE = {"backbone": "backbone", "image_head": "heads", "text_head": "heads",
                  "w_share": "w_share", "contrastive": "contrastive"}
DISTINCT_MULTS = dict(backbone=0.5, word_embedding=2.0, text_cnn=3.0, heads=5.0, w_share=7.0,
                      contrastive=11.0)


def _group(path):
  if path[0] == "text_encoder":
    return "word_embedding" if path[1] == "word_embedding" else "text_cnn"
  return GROUP_OF_SCOPE[path[0]]


def _numpy_sgd(params, grads, steps, lr, mult_of, momentum, decay):
  """optax's SGD with Nesterov momentum and decoupled-from-nothing weight decay on kernels
  (ndim > 1): u = g + decay * p; v = u + momentum * v; p -= lr * mult * (u + momentum * v)."""
  out = {}
  for path, p in params.items():
    p, v = np.asarray(p, np.float64), 0.0
    for _ in range(steps):
      u = np.asarray(grads[path], np.float64) + (decay * p if p.ndim > 1 else 0.0)
      v = u + momentum * v
      p = p - lr * mult_of(path) * (u + momentum * v)
    out[path] = p
  return out


@pytest.mark.parametrize("stage", [1, 2])
def test_each_learning_rate_group_moves_by_its_own_rate(stage):
  """Catches: two groups' multipliers swapped (the configs' text CNN and heads share 0.1, so
  a swap there is invisible to any run), a parameter in the wrong group, the frozen backbone
  moving in Stage I, weight decay on biases, BN parameters or SigLIP's temperature and bias."""
  from flax import traverse_util
  config = tiny_config(**{"optim.lr": 0.1, "optim.momentum": 0.9, "optim.nesterov": True,
                          "optim.weight_decay": 0.01, "optim.schedule": ((10, 1.0),),
                          "loss.ranking": "sigmoid"})
  config = config_lib.set_stage(config, stage)
  for group, mult in DISTINCT_MULTS.items():
    config.optim.lr_mult[group] = mult
  model = build_model(config)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8), jnp.int32))["params"]
  flat_shapes = traverse_util.flatten_dict(shapes)
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in flat_shapes.items()}
  grads = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in flat_shapes.items()}
  assert {_group(k) for k in params} == set(DISTINCT_MULTS)
  tx = optim.make_optimizer(config, 10, traverse_util.unflatten_dict(params))
  nested = traverse_util.unflatten_dict

  @jax.jit
  def two_steps(p, g):
    state = tx.init(p)
    for _ in range(2):
      updates, state = tx.update(g, state, p)
      p = jax.tree_util.tree_map(lambda a, b: a + b, p, updates)
    return p

  got = traverse_util.flatten_dict(jax.device_get(two_steps(nested(params), nested(grads))))
  frozen = stage == 1
  want = _numpy_sgd(params, grads, 2, 0.1,
                    lambda k: 0.0 if frozen and k[0] == "backbone" else DISTINCT_MULTS[_group(k)],
                    0.9, 0.01)
  for key in params:
    where = "/".join(key)
    if frozen and key[0] == "backbone":
      assert np.array_equal(got[key], params[key]), where
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=where)


# ------------------------------------------------------------------------------ W_share dropout


def test_w_share_dropout_keeps_a_quarter_and_scales_by_four():
  """p = 0.75 is a drop probability: a quarter of W_share's inputs kept, each times
  1 / (1 - p) = 4. Catches keep and drop swapped (three quarters kept) and a missing scale."""
  p, rows, dim = 0.75, 64, 2048
  mask = np.asarray(dropout_mask(jax.random.key(3), p, rows, dim))
  assert mask.dtype == bool and mask.shape == (rows, dim)
  # 131,072 Bernoulli(0.25) draws: the kept share's standard deviation is 0.0012.
  assert abs(mask.mean() - 0.25) < 0.006
  # Each row alike (2,048 draws: standard deviation 0.0096), and not one mask for every row
  # (which would drop whole features).
  assert 0.2 < mask.mean(1).min() and mask.mean(1).max() < 0.3
  assert not (mask == mask[:1]).all()
  config = tiny_config(**{"model.dropout": p})
  model = build_model(config)
  features = np.random.default_rng(0).normal(size=(4, config.model.embed_dim)).astype(
      np.float32)
  dim, classes = config.model.embed_dim, config.num_classes
  w = dict(kernel=np.random.default_rng(1).normal(size=(dim, classes)).astype(np.float32),
           bias=np.random.default_rng(2).normal(size=classes).astype(np.float32))
  small_mask = np.asarray(dropout_mask(jax.random.key(4), p, 4, dim))
  # classify reads W_share alone: its parameters are all it needs.
  got = model.apply({"params": {"w_share": w}}, features, small_mask, method=model.classify)
  want = (features * small_mask * 4.0) @ np.asarray(w["kernel"]) + np.asarray(w["bias"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- position shift


def _split_of_lengths(root, lengths, max_len):
  """An EncodedSplit of one 8x8 PNG and one caption per image, of the given lengths."""
  from instance_loss_jax.data import pipeline
  paths = []
  for i in range(len(lengths)):
    paths.append(os.path.join(root, f"{i}.png"))
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(paths[-1])
  tokens = np.zeros((len(lengths), max_len), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = np.arange(1, n + 1)
  n = len(lengths)
  return pipeline.EncodedSplit(np.asarray(paths), np.arange(n, dtype=np.int32),
                               np.arange(n, dtype=np.int32), np.ones(n, np.int32), tokens,
                               np.asarray(lengths, np.int32), np.arange(n, dtype=np.int32), 0)


@pytest.mark.parametrize("enabled", [True, False])
def test_training_batches_shift_each_caption_uniformly_over_its_free_positions(enabled,
                                                                                 tmp_path):
  """The training pipeline's own batches: a caption of n words starts at an offset uniform over
  0..L-n (position shift), its words in order; at 0 when data.position_shift is off. Catches
  the shift switched off in the pipeline, an off-by-one range, a caption cut or reordered."""
  from instance_loss_jax.data import pipeline
  max_len, lengths = 8, (1, 3, 6, 8)
  split = _split_of_lengths(str(tmp_path), lengths, max_len)
  config = tiny_config(**{"data.position_shift": enabled, "batch_size": 8, "image_size": 8})
  batches = pipeline.numpy_batches(pipeline.train_dataset(split, config, 1), split.image_paths)
  offsets = {n: [] for n in lengths}
  for _ in range(150):  # 1,200 captions, 300 of each length
    batch = next(batches)
    for row, label in zip(batch["tokens"], batch["labels"]):
      n = lengths[label]
      nonzero = np.flatnonzero(row)
      assert list(row[nonzero]) == list(range(1, n + 1)) and nonzero[-1] - nonzero[0] == n - 1
      offsets[n].append(int(nonzero[0]))
  for n, seen in offsets.items():
    free = max_len - n + 1 if enabled else 1
    counts = np.bincount(seen, minlength=max_len)
    assert counts[free:].sum() == 0, (n, counts)
    # Uniform over the free offsets: Pearson's chi-square against numpy's expected counts,
    # below its 99.9% point for (free - 1) degrees of freedom (the draws are seeded: the same
    # figure on every machine).
    expected = len(seen) / free
    chi2 = float(((counts[:free] - expected) ** 2 / expected).sum())
    critical = {1: 0.0, 3: 16.27, 6: 20.52, 8: 24.32}[free]
    assert chi2 <= critical, (n, counts[:free], chi2)
    assert (counts[:free] > 0).all()


# ------------------------------------------------------------------- the evaluation protocols


def _encoded(caption_image, labels):
  return types.SimpleNamespace(caption_image=np.asarray(caption_image),
                               labels=np.asarray(labels))


def test_person_retrieval_counts_any_image_of_the_person():
  """CUHK-PEDES: a caption hits any image of its person. Three images, persons (0, 0, 1); each
  caption lies nearest to the other image of its person than its own. Person retrieval: R@1
  100. Image-text retrieval (what Flickr30k and MSCOCO use) would give 0 for those captions:
  catches CUHK-PEDES sent to the image-text metrics."""
  e = np.eye(3, dtype=np.float32)
  img = e
  # captions of image 0 -> nearest image 1 (same person); of image 1 -> image 0; of 2 -> 2.
  txt = np.stack([e[1], e[0], e[2]])
  split = _encoded([0, 1, 2], [0, 0, 1])
  pedes = tiny_config(**{"data.format": "cuhk_pedes"})
  got = evaluator.compute_metrics(pedes, split, img, txt)
  assert got["t2i_r1"] == 100.0
  assert not any(k.startswith("i2t") for k in got)  # text->image only
  # mAP by hand: caption 0's images of person 0 rank 1 (image 1) and 3 (image 0, tied with
  # image 2 at 0, and ties rank the irrelevant image first): AP (1/1 + 2/3) / 2; caption 1's
  # the same; caption 2's is 1.
  assert got["mAP"] == pytest.approx(100 * (2 * (1 + 2 / 3) / 2 + 1) / 3)
  flickr = tiny_config(**{"data.format": "karpathy"})
  other = evaluator.compute_metrics(flickr, split, img, txt)
  assert other["t2i_r1"] == pytest.approx(100 / 3) and other["i2t_r1"] == pytest.approx(100 / 3)


def test_mscoco_reports_its_1k_folds_beside_5k():
  """Ten images in five folds of two: image 2f and 2f + 1 are told apart inside their fold,
  but each equals an image of the next fold, so the whole set confuses them. 1K: R@1 100 in
  every fold; 5K: ties rank against the query, R@1 0. Catches the folds skipped (no 1k_* keys)
  or computed over the whole set."""
  dim = 4
  base = np.eye(dim, dtype=np.float32)
  # Fold f holds images (2f, 2f + 1) = (e_{f mod 2 * 2}, e_{f mod 2 * 2 + 1}): folds 0, 2, 4
  # and folds 1, 3 share their embeddings, so outside a fold each image has a twin.
  img = np.stack([base[(f % 2) * 2 + j] for f in range(5) for j in range(2)])
  txt = img.copy()  # one caption per image, equal to it
  split = _encoded(np.arange(10), np.arange(10))
  coco = tiny_config(**{"eval.coco_1k_folds": 5})
  got = evaluator.compute_metrics(coco, split, img, txt)
  for d in ("i2t", "t2i"):
    assert got[f"1k_{d}_r1"] == 100.0 and got[f"1k_{d}_medr"] == 1
    assert got[f"{d}_r1"] == 0.0  # a twin in another fold ties, and ties count against it
  flickr = tiny_config()
  assert not any(k.startswith("1k_") for k in evaluator.compute_metrics(flickr, split, img, txt))


# --------------------------------------------------------------------------- backbone_bn modes


def _backbone_in_training(mode, images):
  """The image branch's backbone output and BN statistics after one training-mode call."""
  stage = 2 if mode == "train" else 1
  config = config_lib.set_stage(tiny_config(), stage)
  config.backbone_bn = mode
  config_lib.validate_config(config)
  model = build_model(config)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images, jnp.zeros((len(images), 8), jnp.int32))
  # Random parameters drawn here (compiling the model's init takes seconds); stored statistics
  # far from any batch's (mean 3, variance 4), so that using them shows.
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes["params"])
  stats = jax.tree_util.tree_map(lambda s: np.full(s.shape, 3.0, np.float32),
                                 shapes["batch_stats"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: s + 1.0 if jax.tree_util.keystr(path).endswith("['var']") else s, stats)
  variables = {"params": params, "batch_stats": stats}

  # Compiled whole: run eagerly, each primitive would compile on its own (seconds).
  backbone = jax.jit(lambda x: model.apply(
      variables, x, train=True, mutable=["batch_stats"],
      method=lambda m, x, train: m.backbone(x, train=train and m.backbone_batch_stats)))
  return backbone, stats["backbone"]


@pytest.mark.parametrize("mode", ["running", "batch", "train"])
def test_backbone_bn_modes_are_told_apart(mode):
  """running: the backbone normalises with its stored statistics in training (an image's
  features do not depend on the rest of its batch) and leaves them as they are; batch and
  train: with the batch's (they do), and Flax computes new running statistics, which the step
  keeps in train mode only (training/step.py; test_train_step.py's frozen tests check batch
  mode leaves them bit-identical). Catches "batch" behaving as "running" and back."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  b = np.concatenate([a[:2], 5 * rng.normal(size=(2, 32, 32, 3)).astype(np.float32)])
  backbone, stored = _backbone_in_training(mode, a)
  (out_a, new_a), (out_b, _) = backbone(a), backbone(b)
  same_rows = np.allclose(np.asarray(out_a[:2]), np.asarray(out_b[:2]), rtol=1e-5, atol=1e-5)
  assert same_rows == (mode == "running")
  moved = [not np.allclose(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(stored),
      jax.tree_util.tree_leaves(new_a["batch_stats"]["backbone"]))]
  assert all(moved) if mode != "running" else not any(moved)
