"""The train state: the model's variables and SGD's. Three functions build one: abstract (shapes
and shardings, a restore target), created (a random init) and from given variables (Stage I's,
an imported model); two move one: onto a mesh and back to the host.

A global state is laid out by `sharding.shardings`: W_share split over its classes when
`model.w_share_sharding="classes"` (padded to a multiple of the device count), everything else
replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from instance_loss_jax import sharding
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.models import build_model
from instance_loss_jax.training import optim


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def _init_fn(config: ml_collections.ConfigDict):
  if config.num_classes < 1:
    raise ValueError("num_classes is 0: set it, or let the trainer take it from the data")
  model = build_model(config, axis_name=sharding.AXIS)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.model.text.max_len), jnp.int32)
  return model, functools.partial(model.init, images=images, tokens=tokens, train=False)


def init_compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for compiling the random init on `platform`.

  On XLA:CPU nearly all of an init's compile time is LLVM optimising its threefry draws (one per
  parameter); at -O1 instead of the default -O2 it compiles ~2.2x faster and draws the same bits
  (integer arithmetic; tests/test_train_step.py compares every variable bit for bit). A small
  CPU run (the demo, the tests) starts that much sooner. Other platforms keep XLA's defaults.
  """
  return {"xla_backend_optimization_level": 1} if platform == "cpu" else None


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model's variables as shapes and dtypes only (no compute, no compile)."""
  _, init = _init_fn(config)
  return jax.eval_shape(init, jax.random.key(0))


def _drawn_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                 num_padded: int) -> TrainState:
  """A fresh state with a random init drawn from `rng`, for tracing (eval_shape, jit). W_share
  is `num_padded` wide: zero columns after num_classes (the random ones are those of a
  num_classes-wide W_share, so every padding starts from the same model)."""
  model, init = _init_fn(config)
  variables = sharding.pad_classes(init(rng), num_padded)
  tx = optim.make_optimizer(config, steps_per_epoch, variables["params"])
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def variables_of(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def abstract_train_state(config: ml_collections.ConfigDict, steps_per_epoch: float,
                         mesh=None) -> TrainState:
  """The train state as ShapeDtypeStructs, W_share padded for `mesh` and every leaf carrying
  its sharding (a restore target; no compute)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  num_padded = sharding.padded_num_classes(config, mesh)
  abstract = jax.eval_shape(
      lambda k: _drawn_state(config, k, steps_per_epoch, num_padded), jax.random.key(0))
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
      sharding.shardings(abstract, config, mesh))


def create_train_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                       mesh=None) -> TrainState:
  """A fresh train state (random init from `rng`, SGD's state at step 0) created directly in its
  layout on `mesh` (default: every device; no device ever holds a whole sharded W_share)."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  num_padded = sharding.padded_num_classes(config, mesh)
  template = abstract_train_state(config, steps_per_epoch, mesh)
  arrays = jax.jit(
      lambda k: checkpoint.state_tree(_drawn_state(config, k, steps_per_epoch, num_padded)),
      out_shardings=jax.tree_util.tree_map(lambda x: x.sharding,
                                           checkpoint.state_tree(template)),
      compiler_options=init_compiler_options(mesh.devices.flat[0].platform))(rng)
  return template.replace(**arrays)


def state_from_variables(config: ml_collections.ConfigDict, variables: dict[str, Any],
                         steps_per_epoch: float, mesh=None) -> TrainState:
  """A train state at step 0 holding `variables` (host arrays, W_share at num_classes) with a
  fresh optimiser state, laid out on `mesh`.

  What `create_train_state` gives once every variable is replaced, without drawing the random
  ones first: Stage II from Stage I's checkpoint skips a whole random init (its compile on XLA:CPU
  is most of a small run's start-up; on a pod, a W_share of 500k classes drawn to be dropped).
  The optimiser state depends on the parameters' shapes only (SGD's momentum starts at zero).
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  template = abstract_train_state(config, steps_per_epoch, mesh)
  variables = sharding.pad_classes(variables, sharding.padded_num_classes(config, mesh))
  target = jax.tree_util.tree_map(lambda x: x.sharding, checkpoint.state_tree(template))
  params = sharding.place(variables["params"], target["params"])
  batch_stats = sharding.place(variables["batch_stats"], target["batch_stats"])
  opt_state = jax.jit(template.tx.init, out_shardings=target["opt_state"])(params)
  step = jax.device_put(jnp.zeros(template.step.shape, template.step.dtype), target["step"])
  return template.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state)


def place_state(state: TrainState, config: ml_collections.ConfigDict, mesh=None) -> TrainState:
  """A train state of host arrays (W_share at num_classes or padded) laid out on `mesh`."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  state = sharding.pad_classes(state, sharding.padded_num_classes(config, mesh))
  return sharding.place(state, sharding.shardings(state, config, mesh))


def host_state(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """A global train state as host numpy arrays, W_share cut back to num_classes."""
  return sharding.pad_classes(sharding.to_host(state), config.num_classes)
