"""The dual-path model: image ResNet + text CNN, unshared heads, one W_share for both.

Top-level parameter names (backbone, image_head, text_encoder, text_head, w_share, and
contrastive with a contrastive ranking term) are what the optimiser's learning-rate groups and
Stage I's freezing key on.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from instance_loss_jax.config import float32_parts, frozen_scopes
from instance_loss_jax.models.resnet import ResNet
from instance_loss_jax.models.text_cnn import TextCNN


def l2_normalize(x, eps: float = 1e-12):
  """x / |x| along the last axis, in float32 whatever x's dtype (bfloat16 features included)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class Head(nn.Module):
  """`num_layers` x (fc without bias, BN, ReLU). Returns the features before dropout."""
  dim: int
  num_layers: int
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  axis_name: str | None = None
  dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
  bn_dtype: Any = None  # BatchNorm's output dtype (default: dtype)

  @nn.compact
  def __call__(self, x, train: bool = False, final_relu: bool = True):
    """final_relu=False: the last BatchNorm's output (what the original evaluates)."""
    for i in range(self.num_layers):
      x = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name=f"fc{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, axis_name=self.axis_name if train else None,
                       dtype=self.bn_dtype or self.dtype, name=f"bn{i + 1}")(x)
      if final_relu or i + 1 < self.num_layers:
        x = nn.relu(x)
    return x


class ContrastiveScale(nn.Module):
  """The learned log logit scale of a contrastive ranking term and, for SigLIP, its bias: float32
  scalars in the params tree (checkpointed, carried from Stage I to Stage II)."""
  log_scale_init: float
  bias_init: float | None = None

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    out = {"log_scale": self.param("log_scale", nn.initializers.constant(self.log_scale_init),
                                   (), jnp.float32)}
    if self.bias_init is not None:
      out["bias"] = self.param("bias", nn.initializers.constant(self.bias_init), (), jnp.float32)
    return out


class DualPath(nn.Module):
  """Both branches and W_share.

  `__call__` returns a dict with, for each branch, the L2-normalised embedding used for ranking
  and retrieval (`img_emb`, `txt_emb`) and the W_share logits (`img_logits`, `txt_logits`).
  """
  config: ml_collections.ConfigDict  # the `model` part of the run's config
  num_classes: int
  freeze_backbone: bool = False
  backbone_batch_stats: bool = True  # in training: normalise the backbone with batch stats
  axis_name: str | None = None
  # Compute dtype of every layer (the run's `compute_dtype`). Parameters, optimiser state and BN
  # statistics stay float32; embeddings are normalised and losses computed in float32.
  dtype: Any = jnp.float32
  # Parts computed in float32 whatever `dtype` (the run's `float32_parts`, see config.py).
  float32_parts: tuple[str, ...] = ()
  # (log_scale,) for InfoNCE, (log_scale, bias) for SigLIP: the contrastive ranking term's
  # parameters and their starts; () for none (the hinge).
  contrastive_init: tuple[float, ...] = ()

  def _dtype(self, part: str):
    return jnp.float32 if part in self.float32_parts else self.dtype

  def setup(self):
    m = self.config
    bn_dtype = jnp.float32 if "batch_norm" in self.float32_parts else None
    self.backbone = ResNet(depth=m.image.depth, width=m.image.width,
                           stride_variant=m.image.stride_variant, bn_epsilon=m.image.bn_epsilon,
                           stem_pool_pad=tuple(m.image.stem_pool_pad),
                           bn_momentum=m.bn_momentum, axis_name=self.axis_name,
                           dtype=self._dtype("backbone"), bn_dtype=bn_dtype)
    t = m.text
    self.text_encoder = TextCNN(
        vocab_size=t.vocab_size, word_dim=t.word_dim, blocks=tuple(t.blocks),
        widths=tuple(t.widths), first_mids=tuple(t.first_mids), strides=tuple(t.strides),
        bottleneck_ratio=t.bottleneck_ratio, pooling=t.pooling, bn_momentum=m.bn_momentum,
        bn_epsilon=t.bn_epsilon, axis_name=self.axis_name, dtype=self._dtype("text_cnn"),
        bn_dtype=bn_dtype)
    self.image_head = Head(m.embed_dim, m.image_head_layers, m.bn_momentum,
                           m.head_bn_epsilon, self.axis_name, self._dtype("heads"), bn_dtype)
    self.text_head = Head(m.embed_dim, m.text_head_layers, m.bn_momentum, m.head_bn_epsilon,
                          self.axis_name, self._dtype("heads"), bn_dtype)
    if self.contrastive_init:
      self.contrastive = ContrastiveScale(*self.contrastive_init)
    # He init x 0.1 (original): variance 2 / fan_in scaled by 0.1^2.
    self.w_share = nn.Dense(
        self.num_classes, dtype=self._dtype("w_share"), use_bias=m.w_share_bias,
        kernel_init=nn.initializers.variance_scaling(
            2.0 * m.w_share_init_scale**2, "fan_in", "normal"))

  def image_features(self, images, train: bool = False, final_relu: bool = True):
    """Head output (before dropout) of the image branch; final_relu=False: before its ReLU."""
    x = self.backbone(images, train=train and self.backbone_batch_stats)
    if self.freeze_backbone:
      # No gradient flows into a frozen backbone, so XLA skips its backward pass entirely.
      x = jax.lax.stop_gradient(x)
    return self.image_head(x, train=train, final_relu=final_relu)

  def text_features(self, tokens, train: bool = False, final_relu: bool = True):
    """Head output (before dropout) of the text branch; final_relu=False: before its ReLU."""
    return self.text_head(self.text_encoder(tokens, train=train), train=train,
                          final_relu=final_relu)

  def image_embedding(self, images, train: bool = False):
    """The image branch alone: the L2-normalised head output (no dropout, no W_share)."""
    return l2_normalize(self.image_features(images, train))

  def text_embedding(self, tokens, train: bool = False):
    """The text branch alone: the L2-normalised head output (no dropout, no W_share)."""
    return l2_normalize(self.text_features(tokens, train))

  def encode(self, images, tokens, train: bool = False):
    """Both branches without W_share: embeddings and the head outputs W_share reads (before
    dropout). The train step then calls `classify` with its own `dropout_mask`, on the global
    batch's rows against this device's slice of the classes."""
    img = self.image_features(images, train)
    txt = self.text_features(tokens, train)
    return dict(img_emb=l2_normalize(img), txt_emb=l2_normalize(txt), img_features=img,
                txt_features=txt)

  def classify(self, features, keep_mask=None):
    """W_share logits of head outputs; with `keep_mask` (`dropout_mask`) after dropout: kept
    values scaled by 1 / (1 - dropout), the others zero. The model's one dropout."""
    if keep_mask is not None:
      keep = 1.0 - self.config.dropout
      features = jnp.where(keep_mask, features / jnp.asarray(keep, features.dtype),
                           jnp.zeros_like(features))
    return self.w_share(features)

  def __call__(self, images, tokens, train: bool = False):
    out = self.encode(images, tokens, train)
    img, txt = out.pop("img_features"), out.pop("txt_features")
    # W_share applied once to both branches' rows: one product forward and one for its gradient
    # instead of two of each and a sum (the same function).
    both = jnp.concatenate([img, txt])
    mask = None
    if train and self.config.dropout:
      mask = dropout_mask(self.make_rng("dropout"), self.config.dropout, *both.shape)
    logits = self.classify(both, mask)
    out = dict(out, img_logits=logits[:img.shape[0]], txt_logits=logits[img.shape[0]:])
    if self.contrastive_init:
      out["contrastive"] = self.contrastive()
    return out


def dropout_mask(rng, rate: float, rows: int, dim: int):
  """Keep-mask [rows, dim] of W_share's input (True: kept) for `DualPath.classify`. The train
  step draws it whole for the global batch (images' rows, then captions') from its own key on
  every device, so each row's mask depends on its position in the global batch, not on how the
  batch is split."""
  return jax.random.bernoulli(rng, 1.0 - rate, (rows, dim))


def build_model(config: ml_collections.ConfigDict, axis_name: str | None = None,
                num_classes: int | None = None) -> DualPath:
  """The model a run's config describes (stage-dependent freezing included).

  num_classes: W_share's width if not config.num_classes (the train step's per-device model
  holds its slice of the classes).
  """
  return DualPath(config=config.model,
                  num_classes=config.num_classes if num_classes is None else num_classes,
                  freeze_backbone="backbone" in frozen_scopes(config),
                  backbone_batch_stats=config.backbone_bn != "running",
                  axis_name=axis_name, dtype=jnp.dtype(config.compute_dtype),
                  float32_parts=float32_parts(config),
                  contrastive_init=contrastive_init(config.loss))


def contrastive_init(loss: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The contrastive ranking term's parameters' starts (`DualPath.contrastive_init`)."""
  if loss.ranking == "infonce":
    return (float(loss.infonce_log_scale_init),)
  if loss.ranking == "sigmoid":
    return (float(loss.sigmoid_log_scale_init), float(loss.sigmoid_bias_init))
  return ()
