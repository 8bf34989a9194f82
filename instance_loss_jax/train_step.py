"""Train state, the pmapped train step, and the pmapped feature-extraction steps.

Data parallel over local devices with axis name "batch": BatchNorm statistics are synchronised
across devices (nn.BatchNorm(axis_name="batch")), gradients averaged with pmean, and ranking
negatives drawn from the global batch (every device's features all-gathered). Every array of a
batch has leading axes [local_devices, per_device_batch].
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state

from instance_loss_jax import losses, optim
from instance_loss_jax.config import validate_config
from instance_loss_jax.models import build_model, l2_normalize

AXIS = "batch"


class TrainState(train_state.TrainState):
  batch_stats: Any = None


class BatchError(ValueError):
  """A batch whose shapes or values do not fit the config, named field by field."""


def _init_fn(config: ml_collections.ConfigDict):
  validate_config(config)
  if config.num_classes < 1:
    raise ValueError("num_classes is 0: set it, or let the trainer take it from the data")
  model = build_model(config, axis_name=AXIS)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, config.model.text.max_len), jnp.int32)
  return model, functools.partial(model.init, images=images, tokens=tokens, train=False)


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model's variables as shapes and dtypes only (no compute, no compile)."""
  _, init = _init_fn(config)
  return jax.eval_shape(init, jax.random.key(0))


def create_train_state(config: ml_collections.ConfigDict, rng,
                       steps_per_epoch: float) -> TrainState:
  """Initialises the model and optimiser (unreplicated, on the default device)."""
  model, init = _init_fn(config)
  variables = jax.jit(init)(rng)
  tx = optim.make_optimizer(config, steps_per_epoch, variables["params"])
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def variables_of(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _top1(logits, labels):
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _all_gather(x):
  return jax.lax.all_gather(x, AXIS, axis=0, tiled=True)


def _train_step(state: TrainState, batch: dict[str, Any], *, config, schedule, apply_fn):
  """One SGD step on one device's share of the batch (run under pmap).

  `apply_fn` is the config's model's (not `state.apply_fn`): the run's config, compute_dtype
  included, decides the program, whatever model built the state.

  Its randomness (dropout, sampled negatives) is a function of (config.seed, step, device), so a
  resumed run draws what an uninterrupted one would have.
  """
  lambdas = tuple(config.loss.lambdas)
  use_rank = lambdas[0] > 0
  negatives = config.loss.negatives
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), state.step),
                           jax.lax.axis_index(AXIS))
  dropout_rng, negatives_rng = jax.random.split(rng)
  labels = batch["labels"]

  mined_emb = mined_labels = None
  if use_rank and negatives == "mined":
    # The original mined negatives among captions embedded in inference mode: no gradient.
    mined = apply_fn(variables_of(state), batch["mined_tokens"], train=False,
                     method="embed_texts")
    mined_emb = _all_gather(jax.lax.stop_gradient(mined))
    mined_labels = _all_gather(batch["mined_labels"])

  def loss_fn(params):
    outputs, updates = apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["images"],
        batch["tokens"], train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    pool = None
    if use_rank:
      pool = dict(img_emb=_all_gather(outputs["img_emb"]),
                  txt_emb=_all_gather(outputs["txt_emb"]), labels=_all_gather(labels))
    total, terms = losses.total_loss(outputs, labels, lambdas, config.loss.margin, negatives,
                                     negatives_rng, pool, mined_emb, mined_labels)
    return total, (outputs, updates["batch_stats"], terms)

  (total, (outputs, batch_stats, terms)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # Each device's loss is the mean over its anchors; the global loss is their mean. (On one
  # device XLA:CPU still copies every gradient through the all-reduce: ~50 ms a ResNet-50 step.)
  if jax.lax.axis_size(AXIS) > 1:
    grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if config.freeze_backbone:
    # set_to_zero already leaves it unchanged; restoring it keeps it bit-identical (-0.0 + 0).
    new_state = new_state.replace(params={**new_state.params, "backbone": state.params["backbone"]})
  if config.backbone_bn != "train":
    new_state = new_state.replace(
        batch_stats={**batch_stats, "backbone": state.batch_stats["backbone"]})
  metrics = dict(loss=total, rank_loss=terms["rank"], visual_loss=terms["visual"],
                 textual_loss=terms["textual"],
                 img_accuracy=_top1(outputs["img_logits"], labels),
                 txt_accuracy=_top1(outputs["txt_logits"], labels))
  metrics = jax.lax.pmean(metrics, AXIS)
  metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics


def check_batch(batch: dict[str, Any], config: ml_collections.ConfigDict,
                num_devices: int) -> None:
  """Raises BatchError naming every field that does not fit (before anything compiles)."""
  problems = []
  size, length = config.image_size, config.model.text.max_len
  per_device = config.batch_size // (num_devices * jax.process_count())
  expected = {"images": (num_devices, per_device, size, size, 3),
              "tokens": (num_devices, per_device, length),
              "labels": (num_devices, per_device)}
  if config.loss.lambdas[0] > 0 and config.loss.negatives == "mined":
    k = config.loss.num_mined // (num_devices * jax.process_count())
    expected.update(mined_tokens=(num_devices, k, length), mined_labels=(num_devices, k))
  if config.batch_size % (num_devices * jax.process_count()):
    problems.append(f"batch_size={config.batch_size} is not divisible by "
                    f"{num_devices * jax.process_count()} devices")
  for name, shape in expected.items():
    if name not in batch:
      problems.append(f"missing '{name}' (expected shape {shape})")
      continue
    got = tuple(batch[name].shape)
    if got != shape:
      hint = (f" (model.text.max_len={length})" if name.endswith("tokens") and
              got[:-1] == shape[:-1] else "")
      problems.append(f"'{name}' has shape {got}, expected {shape}{hint}")
    if name != "images" and not jnp.issubdtype(batch[name].dtype, jnp.integer):
      problems.append(f"'{name}' has dtype {batch[name].dtype}, expected integers")
  if not problems and isinstance(batch["tokens"], np.ndarray):
    for name, bound, key in (("tokens", config.model.text.vocab_size, "model.text.vocab_size"),
                             ("labels", config.num_classes, "num_classes")):
      lo, hi = int(batch[name].min()), int(batch[name].max())
      if lo < 0 or hi >= bound:
        problems.append(f"'{name}' values span [{lo}, {hi}], outside [0, {bound}) ({key})")
  if problems:
    raise BatchError("batch does not fit the config: " + "; ".join(problems))


def make_train_step(config: ml_collections.ConfigDict, steps_per_epoch: int,
                    devices: Sequence[jax.Device] | None = None):
  """Returns step(state, batch) -> (state, metrics), pmapped over `devices` (default: every
  device of every process; each process passes its local devices' share of the batch).

  state is replicated over the devices (see `replicate`); metrics come back replicated.
  The batch is checked against the config on the host before each call. `step.lower` is the
  pmapped function's (benchmarks read XLA's cost and memory analyses from it).
  """
  validate_config(config)
  num_local = len(devices) if devices else jax.local_device_count()
  pmapped = jax.pmap(
      functools.partial(_train_step, config=config,
                        schedule=optim.lr_schedule(config, steps_per_epoch),
                        apply_fn=build_model(config, axis_name=AXIS).apply),
      axis_name=AXIS, devices=list(devices) if devices else None, donate_argnums=(0,))

  def step(state, batch):
    check_batch(batch, config, num_local)
    return pmapped(state, batch)

  step.lower = pmapped.lower
  return step


def make_embed_fns(config: ml_collections.ConfigDict,
                   devices: Sequence[jax.Device] | None = None):
  """Pmapped, inference-mode (no dropout, running BN statistics) feature extractors.

  Returns (embed_images(variables, images, flip_average), embed_texts(variables, tokens)), both
  giving L2-normalised embeddings shaped like the inputs' [devices, per_device] axes. With
  `flip_average` the image embedding is the normalised mean of the image's and its mirror's.
  """
  model = build_model(config)
  devices = list(devices or jax.local_devices())

  def embed_images(variables, images, flip_average):
    emb = model.apply(variables, images, method="embed_images")
    if flip_average:
      emb = emb + model.apply(variables, images[:, :, ::-1], method="embed_images")
    return l2_normalize(emb)

  def embed_texts(variables, tokens):
    return model.apply(variables, tokens, method="embed_texts")

  return (jax.pmap(embed_images, static_broadcasted_argnums=(2,), devices=devices),
          jax.pmap(embed_texts, devices=devices))


def _device_mesh(devices):
  return jax.sharding.Mesh(np.array(list(devices or jax.local_devices())), (AXIS,))


def replicate(tree, devices: Sequence[jax.Device] | None = None):
  """Copies a pytree (state, rng keys) to every device, with a leading device axis.

  The copies are laid out exactly as the pmapped step's outputs (a NamedSharding over the
  device axis), so the step compiles once rather than again on its second call. Copies are made
  on the host: no per-leaf XLA computation to compile. With several processes (and no explicit
  devices) each process passes host copies for its local devices, as pmap expects.
  """
  if devices is None and jax.process_count() > 1:
    return jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x), (jax.local_device_count(),) + np.shape(x)), tree)
  sharding = jax.sharding.NamedSharding(_device_mesh(devices), jax.sharding.PartitionSpec(AXIS))
  n = sharding.mesh.size

  def put(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.device_put(np.broadcast_to(host, (n,) + host.shape), sharding)

  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
  """The first device's copy of a replicated pytree, as host numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)
