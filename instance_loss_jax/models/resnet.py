"""ResNet image backbone (bottleneck ResNet-50/101/152), classifier removed.

Paddings are explicit and symmetric: Flax's 'SAME' pads stride-2 convolutions asymmetrically,
which would make ported Keras/torchvision weights give different numbers. Layer names are fixed
(stem_conv, stage2_block1/conv1, ...) because the weight porter matches on them. The
convolutions are models/layers.py's: the same functions and parameters as nn.Conv, with
backward passes XLA runs faster.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from instance_loss_jax.config import STAGE_SIZES
from instance_loss_jax.models.layers import PointwiseConv, SquareConv



class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 expansion) with BN and a projection shortcut when shapes change."""
  width: int
  stride: int
  stride_variant: str  # "v1": stride on the first 1x1 conv; "v1.5": on the 3x3 conv
  norm: functools.partial
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s1, s3 = (self.stride, 1) if self.stride_variant == "v1" else (1, self.stride)
    out_width = 4 * self.width
    y = PointwiseConv(self.width, s1, self.dtype, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = SquareConv(self.width, 3, s3, 1, self.dtype, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = PointwiseConv(out_width, 1, self.dtype, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if x.shape[-1] != out_width or self.stride != 1:
      x = PointwiseConv(out_width, self.stride, self.dtype, name="proj_conv")(x)
      x = self.norm(name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Images [B, H, W, 3] -> globally average-pooled features [B, 32 * width]."""
  depth: int = 50
  width: int = 64
  stride_variant: str = "v1"
  bn_epsilon: float = 1e-5
  # The stem's 3x3 stride-2 max pool's padding (top, bottom, left, right): (1, 1, 1, 1) as
  # Keras and torchvision; (0, 1, 0, 1) as Caffe's ceil-mode pooling, made explicit by
  # MatConvNet's imported ResNets. The windows start one pixel apart, so it must be the one the
  # weights were trained with.
  stem_pool_pad: tuple[int, int, int, int] = (1, 1, 1, 1)
  bn_momentum: float = 0.9
  axis_name: str | None = None  # the mesh axis to synchronise BN statistics over (train step)
  # Activations' and matmuls' dtype; parameters and BN statistics stay float32 (BN reduces in
  # float32 too), so bfloat16 changes the arithmetic, never what a checkpoint holds.
  dtype: Any = jnp.float32
  bn_dtype: Any = None  # BatchNorm's output dtype (default: dtype)

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             axis_name=self.axis_name if train else None,
                             dtype=self.bn_dtype or self.dtype)
    # The patches form of the stem's kernel gradient pays at ResNet-50's width (a Stage II step
    # 3.99 s -> 3.78 s on 2 CPU cores), not at the demo's width 8 (36 -> 50 ms).
    x = SquareConv(self.width, 7, 2, 3, self.dtype, patch_kernel_grad=self.width >= 64,
                   name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    # Inputs are >= 0 after the ReLU, so -inf padding (Flax) and zero padding (Keras) agree.
    top, bottom, left, right = self.stem_pool_pad
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((top, bottom), (left, right)))
    for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
      for block in range(num_blocks):
        x = Bottleneck(self.width * 2**stage, stride=2 if stage > 0 and block == 0 else 1,
                       stride_variant=self.stride_variant, norm=norm,
                       dtype=self.dtype,
                       name=f"stage{stage + 2}_block{block + 1}")(x)
    return jnp.mean(x, axis=(1, 2))
