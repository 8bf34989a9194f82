"""Full-size shapes and parameter counts via jax.eval_shape (no compute)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instance_loss_jax.config import base_config
from instance_loss_jax.models import ResNet, build_model
from instance_loss_jax.training import init_compiler_options


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_init(module, *inputs):
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), *inputs)


# torchvision's resnet{50,101,152} totals minus their 2048 x 1000 + 1000 classifier.
@pytest.mark.parametrize("depth,want", [(50, 25_557_032 - 2_049_000),
                                        (101, 44_549_160 - 2_049_000),
                                        (152, 60_192_808 - 2_049_000)])
def test_resnet_parameter_count(depth, want):
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = abstract_init(ResNet(depth=depth), images)
  assert count(variables["params"]) == want
  out = jax.eval_shape(ResNet(depth=depth).apply, variables, images)
  assert out.shape == (2, 2048)


def test_resnet_50_is_23_508_032():
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  assert count(abstract_init(ResNet(depth=50), images)["params"]) == 23_508_032


def bottleneck(cin, mid, cout, projection):
  """Params of one text block written out from docs/design.md: convs without bias, BN scale and
  offset."""
  n = cin * mid + 2 * mid + 2 * mid * mid + 2 * mid + mid * cout + 2 * cout
  return n + (cin * cout + 2 * cout if projection else 0)


def spec_text_cnn_params(vocab):
  embedding = vocab * 300 + 300 + 2 * 300  # table, bias, BatchNorm
  stage_a = bottleneck(300, 128, 256, True) + 2 * bottleneck(256, 64, 256, False)
  stage_b = bottleneck(256, 512, 512, True) + 3 * bottleneck(512, 128, 512, False)
  stage_c = bottleneck(512, 1024, 1024, True) + 5 * bottleneck(1024, 256, 1024, False)
  stage_d = bottleneck(1024, 2048, 2048, True)
  return embedding + stage_a + stage_b + stage_c + stage_d


def test_full_model_shapes_and_counts():
  config = base_config()
  config.num_classes = 29_783
  config.model.text.vocab_size = vocab = 20_074
  model = build_model(config)
  images = jax.ShapeDtypeStruct((3, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((3, 32), jnp.int32)
  variables = abstract_init(model, images, tokens)
  params = variables["params"]
  assert set(params) == {"backbone", "text_encoder", "image_head", "text_head", "w_share"}
  assert count(params["backbone"]) == 23_508_032
  assert count(params["text_encoder"]) == spec_text_cnn_params(vocab)
  fc_bn = 2048 * 2048 + 2 * 2048  # fc without bias, BatchNorm
  assert count(params["image_head"]) == 2 * fc_bn
  assert count(params["text_head"]) == fc_bn
  assert params["w_share"]["kernel"].shape == (2048, 29_783)
  assert count(params["w_share"]) == 2048 * 29_783 + 29_783
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, images, tokens)
  assert {k: v.shape for k, v in out.items()} == {
      "img_emb": (3, 2048), "txt_emb": (3, 2048),
      "img_logits": (3, 29_783), "txt_logits": (3, 29_783)}


def test_text_lengths_and_paper_block_counts():
  config = base_config()
  config.num_classes = 29_783
  config.model.text.blocks = (3, 4, 6, 3)  # the paper's "as many blocks as ResNet-50"
  config.model.text.max_len = 56  # CUHK-PEDES
  model = build_model(config)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 56), jnp.int32)
  variables = abstract_init(model, images, tokens)
  stage4 = [k for k in variables["params"]["text_encoder"] if k.startswith("stage4")]
  assert len(stage4) == 3
  out = jax.eval_shape(functools.partial(model.apply, method="text_embedding"), variables, tokens)
  assert out.shape == (1, 2048)


def test_stride_variants_differ():
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  feats = {}
  for variant in ("v1", "v1.5"):
    net = ResNet(depth=14, width=4, stride_variant=variant)
    variables = jax.jit(net.init, compiler_options=init_compiler_options(jax.default_backend()))(
        jax.random.key(0), images)
    # Same parameter shapes, different placement of the stride: different features.
    feats[variant] = jax.jit(net.apply)(variables, images)
    assert feats[variant].shape == (2, 128)
  assert not np.allclose(feats["v1"], feats["v1.5"])


def test_each_part_normalises_with_its_own_batchnorm_epsilon():
  """The ResNet keeps its weights' epsilon (model.image.bn_epsilon); the text CNN and the heads
  use the authors' (model.text.bn_epsilon, model.head_bn_epsilon): every BatchNorm call seen."""
  import flax.linen as nn
  from helpers import tiny_config
  want = {"backbone": 2e-5, "text_encoder": 3e-3, "image_head": 7e-4, "text_head": 7e-4}
  config = tiny_config(**{"model.image.bn_epsilon": want["backbone"],
                          "model.text.bn_epsilon": want["text_encoder"],
                          "model.head_bn_epsilon": want["image_head"]})
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      seen[context.module.path] = context.module.epsilon
    return next_fun(*args, **kwargs)

  model = build_model(config)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), images, tokens)
  parts = {}
  for path, epsilon in seen.items():
    parts.setdefault(path[0], set()).add(epsilon)
  assert parts == {part: {value} for part, value in want.items()}
  assert len(seen) > 20  # every block's, not one


def test_head_batchnorm_in_training_against_numpy():
  """fc -> BatchNorm on the batch's statistics (biased variance, + epsilon) -> ReLU, at a
  feature variance near epsilon, where 1e-3 and 1e-5 differ by a factor ~1.4."""
  from instance_loss_jax.models import Head
  rng = np.random.default_rng(0)
  x = rng.normal(0, 0.03, (16, 8)).astype(np.float32)
  head = Head(dim=6, num_layers=1, bn_epsilon=1e-3)
  variables = head.init(jax.random.key(0), x)
  kernel = np.asarray(variables["params"]["fc1"]["kernel"], np.float64)
  got, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
  z = x.astype(np.float64) @ kernel
  want = np.maximum((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-3), 0)
  assert 1e-4 < z.var(0).min() and z.var(0).max() < 1e-2  # epsilon matters here
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
