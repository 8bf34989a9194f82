"""The text branch: word embedding, then residual bottlenecks of 1x2 convolutions over words.

Tokens are [B, L] word indices with 0 = padding. Features run as [B, L, C]: the paper's "1 x n"
text image with the length on the convolution's spatial axis.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from instance_loss_jax.models.layers import PairConv, PointwiseConv


class WordEmbedding(nn.Module):
  """The paper's first 1x1xdx300 convolution, as a gather plus a bias (never a one-hot matmul).

  Padding positions are not masked, as in the original. The data pipeline overwrites the table
  with word2vec vectors after init.
  """
  vocab_size: int
  word_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    table = self.param("embedding", nn.initializers.normal(stddev=0.1),
                       (self.vocab_size, self.word_dim))
    bias = self.param("bias", nn.initializers.zeros, (self.word_dim,))
    return (jnp.take(table, tokens, axis=0) + bias).astype(self.dtype)


class TextBottleneck(nn.Module):
  """1x1 -> 1x2 -> 1x1 on the length axis. The 1x2 conv pads one zero on the left (length kept
  at stride 1) and carries the stage's stride, so it sees every word of a strided stage."""
  mid: int
  out: int
  stride: int
  norm: functools.partial
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = PointwiseConv(self.mid, 1, self.dtype, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = PairConv(self.mid, self.stride, self.dtype, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = PointwiseConv(self.out, 1, self.dtype, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if x.shape[-1] != self.out or self.stride != 1:
      # A 1x1 conv with stride s keeps positions 0, s, 2s, ...: the same count as conv2's
      # ceil(L / s) with its one-zero left pad.
      x = PointwiseConv(self.out, self.stride, self.dtype, name="proj_conv")(x)
      x = self.norm(name="proj_bn")(x)
    return nn.relu(x + y)


class TextCNN(nn.Module):
  """Tokens [B, L] -> pooled sentence features [B, widths[-1]]."""
  vocab_size: int
  word_dim: int = 300
  blocks: Sequence[int] = (3, 4, 6, 1)
  widths: Sequence[int] = (256, 512, 1024, 2048)
  first_mids: Sequence[int] = (128, 512, 1024, 2048)
  strides: Sequence[int] = (1, 2, 2, 1)
  bottleneck_ratio: int = 4
  pooling: str = "max"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
  bn_dtype: Any = None  # BatchNorm's output dtype (default: dtype)

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             axis_name=self.axis_name if train else None,
                             dtype=self.bn_dtype or self.dtype)
    x = WordEmbedding(self.vocab_size, self.word_dim, self.dtype, name="word_embedding")(tokens)
    x = norm(name="embedding_bn")(x)  # the original: BN after the embedding, no ReLU
    for stage, num_blocks in enumerate(self.blocks):
      for block in range(num_blocks):
        first = block == 0
        x = TextBottleneck(
            mid=self.first_mids[stage] if first else
            self.widths[stage] // self.bottleneck_ratio,
            out=self.widths[stage], stride=self.strides[stage] if first else 1, norm=norm,
            dtype=self.dtype,
            name=f"stage{stage + 1}_block{block + 1}")(x)
    return jnp.max(x, axis=1) if self.pooling == "max" else jnp.mean(x, axis=1)
