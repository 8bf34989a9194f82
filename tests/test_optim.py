"""The learning-rate schedule: piecewise phases, linear warmup, the batch-size rule; and SGD's
updates following it."""

import jax
import numpy as np
import pytest

from instance_loss_jax.config import ConfigError, base_config, validate_config
from instance_loss_jax.training import optim

from helpers import tiny_config


def _config(**overrides):
  c = base_config()
  c.optim.lr = 0.2
  c.optim.schedule = ((2, 1.0), (1, 0.1))  # 2 epochs at lr, 1 at lr / 10
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def _reference(step, lr, warmup, steps_per_epoch=10):
  """numpy: lr until epoch 2, lr / 10 after; times min(1, (step + 1) / warmup)."""
  base = np.where(step < 2 * steps_per_epoch, lr, lr * 0.1)
  return base * (np.minimum(1.0, (step + 1) / warmup) if warmup else 1.0)


@pytest.mark.parametrize("warmup", [0, 1, 5, 25])
def test_warmup_ramps_into_the_piecewise_schedule(warmup):
  schedule = optim.lr_schedule(_config(**{"optim.warmup_steps": warmup}), 10)
  steps = np.arange(40)
  got = np.array([float(schedule(s)) for s in steps])
  np.testing.assert_allclose(got, _reference(steps, 0.2, warmup), rtol=1e-6)
  assert optim.num_train_steps(_config(**{"optim.warmup_steps": warmup}), 10) == 30


@pytest.mark.parametrize("rule, scale", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_the_batch_rule_scales_every_phase_against_the_reference_batch(rule, scale):
  config = _config(**{"optim.lr_batch_rule": rule, "batch_size": 128,
                      "optim.reference_batch": 32})
  schedule = optim.lr_schedule(config, 10)
  assert optim.batch_scale(config) == pytest.approx(scale)
  for step in (0, 19, 20, 29):
    assert float(schedule(step)) == pytest.approx(float(_reference(step, 0.2 * scale, 0)))
  # At the reference batch every rule is the identity.
  same = _config(**{"optim.lr_batch_rule": rule, "batch_size": 32})
  assert optim.batch_scale(same) == 1.0


def test_sgd_moves_each_group_by_its_rate_during_the_warmup():
  # momentum 0, no decay: an update is -rate * multiplier * gradient, step by step.
  config = tiny_config(**{"optim.warmup_steps": 4, "optim.momentum": 0.0,
                          "optim.nesterov": False, "optim.weight_decay": 0.0,
                          "optim.lr": 0.5, "optim.schedule": ((10, 1.0),)})
  params = {"w_share": {"kernel": np.ones((3, 2), np.float32)},
            "text_head": {"kernel": np.ones((2, 2), np.float32)}}
  tx = optim.make_optimizer(config, 1, params)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  for step in range(6):
    updates, state = tx.update(grads, state, params)
    ramp = min(1.0, (step + 1) / 4)
    for group, mult in (("w_share", config.optim.lr_mult.w_share),
                        ("text_head", config.optim.lr_mult.heads)):
      np.testing.assert_allclose(updates[group]["kernel"], -0.5 * ramp * mult, rtol=1e-6,
                                 err_msg=f"step {step}, {group}")


@pytest.mark.parametrize("key, value, message", [
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1: must be >= 0"),
    ("optim.lr_batch_rule", "cubic", "optim.lr_batch_rule='cubic': one of"),
    ("optim.reference_batch", 0, "optim.reference_batch=0: must be >= 1"),
    ("profile_steps", (3, 2), r"profile_steps=\(3, 2\): \(\) or \(first, last\)"),
    ("profile_steps", (1, 2), r"profile_steps=\(1, 2\): .* 2 <= first"),
    ("data.device_prefetch", -1, "data.device_prefetch=-1: need >= 1 and >= 0"),
])
def test_bad_values_are_named(key, value, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**{key: value}))
