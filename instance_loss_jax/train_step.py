"""Train state and the train step over one device mesh (the batch checks beside them).

The step is data parallel's per-device program, `jax.jit(jax.shard_map(...))` over the mesh of
`sharding.make_mesh` (axis "batch"), which is what `jax.pmap` itself lowers to since JAX 0.8:
BatchNorm statistics synchronised across devices (nn.BatchNorm(axis_name="batch")), gradients
combined over devices, and ranking negatives drawn from the global batch (every device's
features all-gathered). The state and batch are global jax.Arrays: W_share is split over its
classes when `model.w_share_sharding="classes"`, everything else replicated; a batch is split
over its rows, each process supplying its own.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state

from instance_loss_jax import checkpoint, losses, optim, sharding
from instance_loss_jax.config import frozen_scopes, validate_config
from instance_loss_jax.errors import BatchError
from instance_loss_jax.models import build_model, dropout_mask

AXIS = sharding.AXIS


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def _init_fn(config: ml_collections.ConfigDict):
  validate_config(config)
  if config.num_classes < 1:
    raise ValueError("num_classes is 0: set it, or let the trainer take it from the data")
  model = build_model(config, axis_name=AXIS)
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


def _new_state(model, config: ml_collections.ConfigDict, variables: dict[str, Any],
               steps_per_epoch: float, num_padded: int | None) -> TrainState:
  """A step-0 state holding `variables` and a fresh optimiser state. num_padded: W_share's width,
  zero columns after num_classes (the random ones are those of a num_classes-wide W_share, so
  every padding starts from the same model)."""
  if num_padded is not None:
    variables = sharding.pad_classes(variables, num_padded)
  tx = optim.make_optimizer(config, steps_per_epoch, variables["params"])
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def _drawn_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                 num_padded: int | None) -> TrainState:
  """A fresh state with a random init drawn from `rng`, for tracing (eval_shape, jit)."""
  model, init = _init_fn(config)
  return _new_state(model, config, init(rng), steps_per_epoch, num_padded)


def create_train_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                       num_padded: int | None = None) -> TrainState:
  """Initialises the model and optimiser on the default device (see `init_train_state` for a
  mesh); num_padded as in `_new_state`."""
  model, init = _init_fn(config)
  variables = jax.jit(init, compiler_options=init_compiler_options(jax.default_backend()))(rng)
  return _new_state(model, config, variables, steps_per_epoch, num_padded)


def variables_of(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _train_step(arrays: dict[str, Any], batch: dict[str, Any], *, config, tx, schedule,
                num_padded: int, collectives: bool):
  """One SGD step: the per-device program (under shard_map when `collectives`, else the whole
  one-device program).

  Every term is made a global mean before differentiation (pmean, or psum inside the
  class-sharded softmax), so the loss is the same on every device; shard_map's autodiff then
  sums the gradients of replicated parameters over the devices, while each device's slice of
  W_share gets its own columns' gradient.

  Randomness (dropout, sampled negatives) is a function of (config.seed, step, position in the
  global batch): the same run on 1, 4 or 8 devices draws the same masks and negatives.
  """
  state = TrainState(apply_fn=None, tx=tx, **arrays)
  axis = AXIS if collectives else None
  num_devices = jax.lax.axis_size(AXIS) if collectives else 1
  device = jax.lax.axis_index(AXIS) if collectives else 0
  split_classes = collectives and sharding.classes_sharded(config)
  model = build_model(config, axis_name=axis,
                      num_classes=num_padded // num_devices if split_classes else num_padded)
  gather = (lambda x: jax.lax.all_gather(x, AXIS, axis=0, tiled=True)) if collectives else (
      lambda x: x)
  mean = (lambda x: jax.lax.pmean(x, AXIS)) if collectives else (lambda x: x)

  l_rank = float(config.loss.lambdas[0])  # 0: no ranking term, nothing of it computed
  negatives = config.loss.negatives
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  dropout_rng, negatives_rng = jax.random.split(rng)
  labels = batch["labels"]
  rows = labels.shape[0]
  global_rows = rows * num_devices
  all_labels = gather(labels)

  mined_emb = mined_labels = None
  if l_rank and negatives == "mined":
    # The original mined negatives among captions embedded in inference mode: no gradient.
    mined = model.apply(variables_of(state), batch["mined_tokens"], train=False,
                        method="text_embedding")
    mined_emb = gather(jax.lax.stop_gradient(mined))
    mined_labels = gather(batch["mined_labels"])

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, updates = model.apply(variables, batch["images"], batch["tokens"], train=True,
                               mutable=["batch_stats"], method="encode")
    img, txt = out["img_features"], out["txt_features"]
    mask = dropout_mask(dropout_rng, config.model.dropout, 2 * global_rows, img.shape[-1])
    if split_classes:
      # Every device scores the whole global batch against its slice of the classes.
      img, txt, row_labels = gather(img), gather(txt), all_labels
    else:
      # Each device scores its own rows against all classes: its rows of the global mask.
      pick = lambda m: jax.lax.dynamic_slice_in_dim(m, device * rows, rows)
      mask = jnp.concatenate([pick(mask[:global_rows]), pick(mask[global_rows:])])
      row_labels = labels
    logits = model.apply(variables, jnp.concatenate([img, txt]), mask, method="classify")
    cross_entropy, correct = losses.instance_loss_per_row(
        logits, jnp.concatenate([row_labels, row_labels]), config.num_classes,
        AXIS if split_classes else None)
    n = row_labels.shape[0]
    terms = dict(visual_loss=jnp.mean(cross_entropy[:n]), textual_loss=jnp.mean(cross_entropy[n:]),
                 img_accuracy=jnp.mean(correct[:n]), txt_accuracy=jnp.mean(correct[n:]))
    # Split classes: the losses are global already (psum inside); the hits are the same on
    # every device, but compared with all-gathered labels, which shard_map types as varying.
    terms = {k: v if split_classes and k.endswith("loss") else mean(v) for k, v in terms.items()}
    terms["rank_loss"] = jnp.zeros((), jnp.float32)
    if l_rank:
      terms["rank_loss"] = mean(losses.ranking_loss_against(
          out["img_emb"], out["txt_emb"], labels, gather(out["img_emb"]), gather(out["txt_emb"]),
          all_labels, config.loss.margin, negatives, negatives_rng, mined_emb, mined_labels,
          anchor_rows=(device * rows, global_rows)))
    total = losses.total_loss(config.loss.lambdas, terms["rank_loss"], terms["visual_loss"],
                              terms["textual_loss"])
    return total, (terms, updates["batch_stats"])

  (total, (metrics, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  for scope in frozen_scopes(config):
    # set_to_zero already leaves it unchanged; restoring it keeps it bit-identical (-0.0 + 0).
    new_state = new_state.replace(params={**new_state.params, scope: state.params[scope]})
  if config.backbone_bn != "train":
    new_state = new_state.replace(
        batch_stats={**batch_stats, "backbone": state.batch_stats["backbone"]})
  metrics = dict(metrics, loss=total, learning_rate=schedule(state.step))
  return checkpoint.state_tree(new_state), metrics


def check_batch(batch: dict[str, Any], config: ml_collections.ConfigDict, mesh) -> None:
  """Raises BatchError naming every field that does not fit (before anything compiles).

  `batch` is this process's rows of the global batch, as numpy arrays without a device axis.
  """
  problems = []
  size, length = config.image_size, config.model.text.max_len
  processes, devices = jax.process_count(), mesh.size
  rows = config.batch_size // processes
  expected = {"images": (rows, size, size, 3), "tokens": (rows, length), "labels": (rows,)}
  if config.loss.lambdas[0] > 0 and config.loss.negatives == "mined":
    k = config.loss.num_mined // processes
    expected.update(mined_tokens=(k, length), mined_labels=(k,))
    if config.loss.num_mined % devices:
      problems.append(f"loss.num_mined={config.loss.num_mined} is not divisible by "
                      f"{devices} devices")
  if config.batch_size % devices:
    problems.append(f"batch_size={config.batch_size} is not divisible by {devices} devices")
  for name, shape in expected.items():
    if name not in batch:
      problems.append(f"missing '{name}' (expected shape {shape})")
      continue
    got = tuple(np.shape(batch[name]))
    if got != shape:
      hint = (f" (model.text.max_len={length})" if name.endswith("tokens") and
              got[:-1] == shape[:-1] else "")
      problems.append(f"'{name}' has shape {got}, expected {shape}{hint}")
    if name != "images" and not jnp.issubdtype(batch[name].dtype, jnp.integer):
      problems.append(f"'{name}' has dtype {batch[name].dtype}, expected integers")
  if not problems:
    for name, bound, key in (("tokens", config.model.text.vocab_size, "model.text.vocab_size"),
                             ("labels", config.num_classes, "num_classes")):
      lo, hi = int(np.min(batch[name])), int(np.max(batch[name]))
      if lo < 0 or hi >= bound:
        problems.append(f"'{name}' values span [{lo}, {hi}], outside [0, {bound}) ({key})")
  if problems:
    raise BatchError("batch does not fit the config: " + "; ".join(problems))


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as shapes with the step's input sharding (for lowering without data)."""
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  n, size, length = config.batch_size, config.image_size, config.model.text.max_len
  shapes = dict(images=((n, size, size, 3), jnp.float32), tokens=((n, length), jnp.int32),
                labels=((n,), jnp.int32))
  if config.loss.lambdas[0] > 0 and config.loss.negatives == "mined":
    shapes.update(mined_tokens=((config.loss.num_mined, length), jnp.int32),
                  mined_labels=((config.loss.num_mined,), jnp.int32))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=spec) for k, (s, d) in shapes.items()}


def make_train_step(config: ml_collections.ConfigDict, steps_per_epoch: float, mesh=None):
  """Returns step(state, batch) -> (state, metrics) over `mesh` (default: every device of every
  process, `sharding.make_mesh()`).

  state: a global TrainState laid out by `sharding.shardings` (see `init_train_state`,
  `place_state`); batch: this process's rows as numpy (checked against the config first, then
  assembled into global arrays). Metrics come back replicated. `step.jitted` is the compiled
  function of (state arrays `checkpoint.state_tree(state)`, global batch): benchmarks lower it
  (`abstract_batch`) for XLA's analyses.
  """
  validate_config(config)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  num_padded = sharding.padded_num_classes(config, mesh)
  collectives = mesh.size > 1
  template = abstract_train_state(config, steps_per_epoch, mesh)
  # The step maps the state's arrays (a plain dict): TrainState's static fields (apply_fn, tx)
  # differ between instances and would break the match with in_specs.
  fn = functools.partial(_train_step, config=config, tx=template.tx,
                         schedule=optim.lr_schedule(config, steps_per_epoch),
                         num_padded=num_padded, collectives=collectives)
  state_specs = sharding.partition_specs(checkpoint.state_tree(template), config)
  batch_spec = jax.sharding.PartitionSpec(AXIS)
  if collectives:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(state_specs, batch_spec),
                       out_specs=(state_specs, jax.sharding.PartitionSpec()))
  # One device: the per-device program is the whole program; no collective is emitted.
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  jitted = jax.jit(fn, donate_argnums=(0,),
                   out_shardings=(jax.tree_util.tree_map(named, state_specs),
                                  named(jax.sharding.PartitionSpec())))

  def step(state, batch):
    check_batch(batch, config, mesh)
    arrays, metrics = jitted(checkpoint.state_tree(state), sharding.global_batch(batch, mesh))
    return state.replace(**arrays), metrics

  step.jitted = jitted
  step.mesh = mesh
  return step


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


def init_train_state(config: ml_collections.ConfigDict, rng, steps_per_epoch: float,
                     mesh=None) -> TrainState:
  """A fresh train state created directly in its sharded layout on `mesh` (no device ever
  holds a whole sharded W_share)."""
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

  What `init_train_state` gives once every variable is replaced, without drawing the random
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
