"""training.flops: XLA's FLOP count against the model's own layer shapes; the peak table."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from instance_loss_jax import sharding, training as ts
from instance_loss_jax.models import build_model
from instance_loss_jax.models import layers as layers_lib
from instance_loss_jax.training import flops

from helpers import random_batch, tiny_config
from test_train_step import STAGE2


def _valid_taps(size_in: int, size_out: int, kernel: int, stride: int, pad: int) -> int:
  """Kernel taps that land inside the input, summed over the output positions of one axis."""
  return sum(0 <= o * stride - pad + k < size_in for o in range(size_out) for k in range(kernel))


def _analytic_forward_flops(model, variables, images, tokens) -> float:
  """2 x the multiply-adds of the model's products and convolutions, from each layer's input and
  output shapes and its own attributes: dense layers and 1x1 convolutions 2 * outputs * fan-in;
  the text CNN's pair convolution the same over both taps (its left pad is a row of zeros that
  is multiplied); square convolutions only over the taps inside the image (XLA skips padding)."""
  layers = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(
        context.module, (nn.Dense, layers_lib.PointwiseConv, layers_lib.PairConv,
                         layers_lib.SquareConv)):
      layers.append((context.module, args[0].shape, out.shape))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, images, tokens, train=False), variables)
  total = 0.0
  for module, x, y in layers:
    if isinstance(module, layers_lib.SquareConv):
      taps = (_valid_taps(x[1], y[1], module.size, module.stride, module.pad) *
              _valid_taps(x[2], y[2], module.size, module.stride, module.pad))
      total += 2 * y[0] * y[-1] * x[-1] * taps
    else:
      pairs = 2 if isinstance(module, layers_lib.PairConv) else 1
      total += 2 * np.prod(y) * x[-1] * pairs
  assert len(layers) > 20
  return total


def test_xla_counts_the_models_products_and_convolutions():
  config = tiny_config()
  model = build_model(config)
  batch = random_batch(config)
  images, tokens = batch["images"], batch["tokens"]
  # Shapes are all either count needs: no init is drawn, nothing runs.
  variables = ts.abstract_variables(config)
  analytic = _analytic_forward_flops(model, variables, images, tokens)
  forward = jax.jit(lambda v, i, t: model.apply(v, i, t, train=False))
  counted = flops.compiled_flops(forward.lower(variables, images, tokens).compile())
  # XLA counts the same products plus the elementwise work around them (batch norm, ReLU,
  # residual adds, pooling): a little more (7% in this narrow model, 1% at width 64), never less.
  assert analytic <= counted <= 1.1 * analytic, (counted, analytic)


@pytest.mark.slow
def test_the_steps_count_is_a_forward_and_a_backward():
  # Stage II, one device: the step's count (step.flops, the executable the step ran) holds the
  # forward, its backward (about twice the forward's products) and the optimiser.
  config = tiny_config(**STAGE2)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = ts.make_train_step(config, 10, mesh)
  state = ts.create_train_state(config, jax.random.key(0), 10, mesh)
  batch = step.place(random_batch(config))
  state, _ = step(state, batch)
  counted = step.flops(state, batch)
  model = build_model(config)
  analytic = _analytic_forward_flops(model, ts.variables_of(state), np.asarray(
      batch["images"]), np.asarray(batch["tokens"]))
  assert 2.7 * analytic < counted < 3.7 * analytic, counted / analytic  # 3.21 when written


@pytest.mark.parametrize("kind, dtype, peak", [
    ("TPU v4", "bfloat16", 275.0), ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "float32", 459.0), ("TPU v6 lite", "bfloat16", 918.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "float32", 378.0),
    ("NVIDIA H200", "float32", 494.0), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA H100 NVL", "bfloat16", None), ("cpu", "float32", None),
    ("NVIDIA GeForce RTX 4090", "bfloat16", None)])
def test_peaks_by_device_kind(kind, dtype, peak):
  assert flops.peak_tflops(kind, dtype) == peak


def test_utilisation_has_no_mfu_without_a_peak():
  assert flops.utilisation(2e12, 0.5, "cpu", "float32") == {"tflops_per_device": 1.0}
  use = flops.utilisation(2e12, 50.0, "TPU v4", "bfloat16")
  assert use["tflops_per_device"] == pytest.approx(100.0)
  assert use["mfu"] == pytest.approx(100.0 / 275.0)
  assert flops.utilisation(None, 1.0, "TPU v4", "bfloat16") == {}
