"""models/layers.py against the flax.linen convolutions they replace: same parameters, same values,
same gradients (for the inputs and the kernels), at the strides and paddings the models use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instance_loss_jax.models import layers


def normal(seed, shape):
  # numpy's draws: jax.random's would compile a threefry program for every shape (seconds each
  # on XLA:CPU) and test nothing more.
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def values_and_grads(module, x):
  """Output, d(sum(out * r))/dx and /dkernel for `module`'s own kernel initialisation."""
  params = module.init(jax.random.key(0), x)["params"]
  out = module.apply({"params": params}, x)
  r = normal(1, out.shape)
  loss = lambda p, v: jnp.sum(module.apply({"params": p}, v) * r)  # noqa: E731
  gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
  return params, out, gx, gp


def assert_same_as(ours, reference, x):
  p1, out1, gx1, gp1 = values_and_grads(ours, x)
  p2, out2, gx2, gp2 = values_and_grads(reference, x)
  assert jax.tree_util.tree_structure(p1) == jax.tree_util.tree_structure(p2)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(a, b)  # the same initialiser on the same key
  for a, b in ((out1, out2), (gx1, gx2), (gp1["kernel"], gp2["kernel"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_is_a_1x1_conv(stride):
  x = normal(2, (2, 7, 9, 5))
  assert_same_as(layers.PointwiseConv(6, stride), nn.Conv(6, (1, 1), (stride, stride),
                                                          padding="VALID", use_bias=False), x)
  text = normal(3, (2, 7, 5))
  assert_same_as(layers.PointwiseConv(6, stride), nn.Conv(6, (1,), (stride,), padding="VALID",
                                                          use_bias=False), text)


@pytest.mark.parametrize("size,stride,pad", [(3, 1, 1), (3, 2, 1), (7, 2, 3)])
def test_square_conv_kernel_gradient_is_the_convolutions(size, stride, pad):
  x = normal(4, (2, 11, 10, 3))
  assert_same_as(layers.SquareConv(4, size, stride, pad, patch_kernel_grad=True),
                 nn.Conv(4, (size, size), (stride, stride), padding=((pad, pad), (pad, pad)),
                         use_bias=False), x)


@pytest.mark.parametrize("stride,length", [(1, 8), (2, 8), (2, 7)])
def test_pair_conv_is_the_left_padded_1x2_conv(stride, length):
  x = normal(5, (3, length, 6))
  assert_same_as(layers.PairConv(5, stride),
                 nn.Conv(5, (2,), (stride,), padding=((1, 0),), use_bias=False), x)



def test_patch_kernel_gradient_under_shard_map_sums_over_devices():
  # The replicated stem kernel meets per-device images: its custom gradient must be summed over
  # the mesh like XLA's own convolution's.
  from instance_loss_jax import sharding
  mesh = sharding.make_mesh(jax.devices()[:4])
  spec = jax.sharding.PartitionSpec
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
  kernel = rng.normal(size=(7, 7, 3, 8)).astype(np.float32)

  def grad(conv):
    def per_device(k, x):
      return jax.lax.pmean(jnp.mean(conv(x, k, 2, 3) ** 2), sharding.AXIS)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(spec(), spec(sharding.AXIS)),
                       out_specs=spec())
    return jax.jit(jax.grad(lambda k: fn(k, x)))(kernel)

  np.testing.assert_allclose(grad(layers.conv_im2col_wgrad), grad(layers._conv),  # pylint: disable=protected-access
                             rtol=1e-4, atol=1e-5)
