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

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state

from instance_loss_jax import sharding
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.models import build_model
from instance_loss_jax.training import optim


_VARIABLES = ("params", "batch_stats")


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


def _flat_variables(tree) -> dict[str, Any]:
  """{"params/backbone/conv_init/kernel": leaf, ...} of a {params, batch_stats} tree."""
  return flax.traverse_util.flatten_dict(
      flax.core.unfreeze({k: tree[k] for k in _VARIABLES if k in tree}), sep="/")


def create_train_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                       mesh=None, given: dict[str, Any] | None = None,
                       given_all: bool = False) -> TrainState:
  """A fresh train state (random init from `rng`, SGD's state at step 0) created directly in its
  layout on `mesh` (default: every device; no device ever holds a whole sharded W_share).

  `given`: variables ({params, batch_stats} host arrays, any subset of the leaves, W_share at
  num_classes) that replace the random ones: the ported ImageNet backbone, the word2vec table,
  Stage I's variables. Those are not drawn: the init program returns only the other leaves, and
  XLA drops what nothing reads (a leaf's draw is a threefry of a key folded from its own path,
  so the rest are bit for bit a whole init's). A fresh Stage I from `backbone_init` compiles
  about half the draws; with every leaf given nothing is drawn at all.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh()
  num_padded = sharding.padded_num_classes(config, mesh)
  template = abstract_train_state(config, steps_per_epoch, mesh)
  target = jax.tree_util.tree_map(lambda x: x.sharding, checkpoint.state_tree(template))
  flat_target = _flat_variables(target)
  flat_template = _flat_variables(checkpoint.state_tree(template))
  flat_given = _flat_variables(sharding.pad_classes(given or {}, num_padded))
  unknown = sorted(set(flat_given) - set(flat_target))
  missing = sorted(set(flat_target) - set(flat_given)) if given_all else []
  if missing:
    raise ValueError(f"variables missing: {', '.join(missing)}")
  shapes = sorted(f"{k}: {np.shape(x)} given, {flat_template[k].shape} in the model"
                  for k, x in flat_given.items()
                  if k in flat_template and np.shape(x) != flat_template[k].shape)
  if unknown or shapes:
    raise ValueError("given variables that do not fit the model: "
                     + "; ".join([*(f"{k}: not in the model" for k in unknown), *shapes]))
  flat_given = {k: x if isinstance(x, jax.Array) else np.asarray(x, flat_template[k].dtype)
                for k, x in flat_given.items()}

  def drawn(k):
    tree = checkpoint.state_tree(_drawn_state(config, k, steps_per_epoch, num_padded))
    return _without(tree, flat_given)

  arrays = jax.jit(drawn, out_shardings=_without(target, flat_given),
                   compiler_options=init_compiler_options(mesh.devices.flat[0].platform))(rng)
  placed = sharding.place(flat_given, {k: flat_target[k] for k in flat_given})
  variables = flax.traverse_util.unflatten_dict({**arrays.pop("variables"), **placed}, sep="/")
  return template.replace(**arrays, **{k: variables.get(k, {}) for k in _VARIABLES})


def _without(tree: dict[str, Any], flat_given: dict[str, Any]) -> dict[str, Any]:
  """A state tree with its variables flat and those in `flat_given` left out."""
  rest = {k: v for k, v in tree.items() if k not in _VARIABLES}
  return dict(rest, variables={k: v for k, v in _flat_variables(tree).items()
                               if k not in flat_given})


def state_from_variables(config: ml_collections.ConfigDict, variables: dict[str, Any],
                         steps_per_epoch: float, mesh=None) -> TrainState:
  """A train state at step 0 holding `variables` (host arrays, W_share at num_classes) with a
  fresh optimiser state, laid out on `mesh`: `create_train_state` with every leaf given, so
  nothing is drawn (Stage II from Stage I's checkpoint; an imported model). The optimiser state
  depends on the parameters' shapes only (SGD's momentum starts at zero)."""
  return create_train_state(config, jax.random.key(0), steps_per_epoch, mesh, given=variables,
                            given_all=True)


def place_state(state: TrainState, config: ml_collections.ConfigDict, mesh=None) -> TrainState:
  """A train state of host arrays (W_share at num_classes or padded) laid out on `mesh`."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  state = sharding.pad_classes(state, sharding.padded_num_classes(config, mesh))
  return sharding.place(state, sharding.shardings(state, config, mesh))


def host_state(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """A global train state as host numpy arrays, W_share cut back to num_classes."""
  return sharding.pad_classes(sharding.to_host(state), config.num_classes)
