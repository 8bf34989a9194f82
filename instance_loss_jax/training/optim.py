"""SGD with per-group learning rates, weight decay and Stage I's frozen backbone.

Groups (docs/design.md): backbone, word_embedding, text_cnn, heads, w_share, and contrastive (the
learned temperature of a contrastive ranking term). Each group's rate
is `optim.lr * optim.lr_mult[group] * schedule(step)`.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from instance_loss_jax.config import frozen_scopes

FROZEN = "frozen"


def param_group(path: tuple[str, ...]) -> str:
  """The learning-rate group of a parameter, from its path in the params tree."""
  top = path[0]
  if top == "backbone":
    return "backbone"
  if top == "text_encoder":
    return "word_embedding" if path[1] == "word_embedding" else "text_cnn"
  if top in ("image_head", "text_head"):
    return "heads"
  if top in ("w_share", "contrastive"):
    return top
  raise ValueError(f"parameter {'/'.join(path)} belongs to no learning-rate group")


def param_labels(params, frozen: tuple[str, ...] = ()):
  """A tree like `params` holding each leaf's group name (FROZEN under a `frozen` scope)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {path: FROZEN if path[0] in frozen else param_group(path) for path in flat}
  return flax.traverse_util.unflatten_dict(labels)


def batch_scale(config: ml_collections.ConfigDict) -> float:
  """The rates' factor for `batch_size` against `optim.reference_batch` by `optim.lr_batch_rule`
  ("none": 1; "linear": the ratio; "sqrt": its square root)."""
  ratio = config.batch_size / config.optim.reference_batch
  return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.optim.lr_batch_rule]


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The base learning rate per step: `optim.schedule` ((epochs, factor), ...) of `optim.lr`,
  scaled for the batch (`batch_scale`), ramped over the first `optim.warmup_steps`."""
  opt = config.optim
  lr = opt.lr * batch_scale(config)
  boundaries, values, epochs = [], [], 0
  for num_epochs, factor in opt.schedule:
    values.append(lr * factor)
    epochs += num_epochs
    boundaries.append(int(round(epochs * steps_per_epoch)))
  schedule = optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries[:-1])
  if not opt.warmup_steps:
    return schedule
  # (step + 1) / warmup: the first update already moves (a ramp from 0 would waste it).
  return lambda step: schedule(step) * jnp.minimum(1.0, (step + 1) / opt.warmup_steps)


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(sum(p[0] for p in config.optim.schedule) * steps_per_epoch))


def _decay_mask(params):
  # Decay kernels and embedding tables only: not BN scales/offsets or biases.
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   params) -> optax.GradientTransformation:
  """optax.multi_transform over the groups; a frozen backbone gets set_to_zero."""
  schedule = lr_schedule(config, steps_per_epoch)
  opt = config.optim

  def group_tx(mult):
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
        optax.sgd(lambda step: schedule(step) * mult, momentum=opt.momentum,
                  nesterov=opt.nesterov))

  transforms = {group: group_tx(mult) for group, mult in opt.lr_mult.items()}
  transforms[FROZEN] = optax.set_to_zero()
  return optax.multi_transform(transforms, param_labels(params, frozen_scopes(config)))
