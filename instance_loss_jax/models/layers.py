"""Convolutions written for XLA's strengths, shared by both branches.

Each keeps the parameter (name, shape, initialiser) of the `flax.linen` layer it replaces, so
checkpoints and ported weights are unaffected, and computes the same function; what changes is
the program XLA is given for the backward pass (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PointwiseConv(nn.Module):
  """A 1x1 (or 1-wide, for text) convolution without bias, written as a matrix product.

  Same parameter as `nn.Conv(features, (1,) * n, strides)`: `kernel` [1, ..., 1, in, out] with
  nn.Conv's initialiser, so checkpoints and ported weights are unaffected. Why not nn.Conv:
  XLA:CPU runs the kernel gradient of a 1x1 convolution as a generic convolution, 6-12x slower
  than PyTorch's; written as a product (autodiff then gives products for both gradients, on
  every backend) the full-size Stage II step ran 1.59x faster (benchmarks/RESULTS.md).
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    spatial = x.ndim - 2
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (1,) * spatial + (x.shape[-1], self.features))
    if self.strides != 1:
      # A 1x1 convolution with stride s reads positions 0, s, 2s, ... of each spatial axis.
      x = x[(slice(None),) + (slice(None, None, self.strides),) * spatial]
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return jnp.dot(x, kernel.reshape(kernel.shape[-2:]))


def _patches(x, size, stride, pad):
  """[B, H, W, C] -> [B, H', W', size * size * C]: each output pixel's input window (im2col),
  in the (row, column, channel) order of a [size, size, C, out] kernel."""
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h = (x.shape[1] - size) // stride + 1
  w = (x.shape[2] - size) // stride + 1
  return jnp.concatenate([x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
                          for i in range(size) for j in range(size)], axis=-1)


def _conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col_wgrad(x, kernel, stride: int, pad: int):
  """A square-kernel NHWC convolution whose kernel gradient is one matrix product.

  Forward and input gradient are XLA's convolutions; the kernel gradient is patches^T @ dy.
  Why: XLA:CPU's kernel gradient of ResNet-50's 7x7 stride-2 stem (3 input channels) takes
  236 ms at batch 8 on 2 cores, PyTorch's 17 ms, this form 87 ms (benchmarks/RESULTS.md). It
  is no gain for 3x3 convolutions or small widths: building the patches (k*k times the input,
  in memory too) costs more than XLA's convolution saves there.
  """
  return _conv(x, kernel, stride, pad)


def _conv_fwd(x, kernel, stride, pad):
  return _conv(x, kernel, stride, pad), (x, kernel)


def _varying_axes(x) -> frozenset:
  """The shard_map mesh axes over which x's value differs between devices (JAX's type)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier versions call it vma
  return mat.varying if mat is not None else frozenset(getattr(aval, "vma", ()))


def _conv_bwd(stride, pad, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _conv(v, kernel, stride, pad), x)
  patches = _patches(x, kernel.shape[0], stride, pad)
  dk = jnp.dot(patches.reshape(-1, patches.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
  # Under shard_map a replicated kernel meets per-device inputs: its gradient must be summed
  # over the mesh axes the product varies over and it does not (what autodiff does for XLA's
  # own convolution).
  extra = tuple(sorted(_varying_axes(dk) - _varying_axes(kernel)))
  if extra:
    dk = jax.lax.psum(dk, extra)
  return input_vjp(dy)[0], dk.reshape(kernel.shape).astype(kernel.dtype)


conv_im2col_wgrad.defvjp(_conv_fwd, _conv_bwd)


class SquareConv(nn.Module):
  """`nn.Conv(features, (size, size), stride, padding=pad, use_bias=False)` (same `kernel`
  parameter and initialiser); with `patch_kernel_grad`, on CPU, through `conv_im2col_wgrad`."""
  features: int
  size: int
  stride: int = 1
  pad: int = 0
  dtype: Any = jnp.float32
  patch_kernel_grad: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (self.size, self.size, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if not self.patch_kernel_grad or jax.default_backend() != "cpu":
      # cuDNN's and the TPU's kernel gradients are fast, and the patches would cost k*k times
      # the input's memory: only XLA:CPU gets the product form.
      return _conv(x, kernel, self.stride, self.pad)
    return conv_im2col_wgrad(x, kernel, self.stride, self.pad)


class PairConv(nn.Module):
  """The text CNN's 1x2 convolution along the length axis of [B, L, C], one zero padded on the
  left, stride `strides`: `nn.Conv(features, (2,), strides, padding=((1, 0),), use_bias=False)`
  (same `kernel` [2, in, out]), written as one product of [previous word, word] pairs.

  Why: XLA:CPU transposes the kernel for the convolution's input gradient on every step, ~70 ms
  for the 2048-wide last stage (more than that stage's arithmetic).
  """
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (2, x.shape[-1], self.features))
    length = -(-x.shape[1] // self.strides)
    padded = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))
    # Output t reads input positions s*t - 1 (zero for t = 0) and s*t.
    pairs = jnp.concatenate([padded[:, 0:self.strides * length:self.strides],
                             padded[:, 1:self.strides * length + 1:self.strides]], axis=-1)
    return jnp.dot(pairs.astype(self.dtype), kernel.reshape(-1, self.features).astype(self.dtype))
