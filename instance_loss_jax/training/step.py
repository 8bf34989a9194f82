"""The train step over one device mesh.

The step is data parallel's per-device program, `jax.jit(jax.shard_map(...))` over the mesh of
`sharding.make_mesh` (axis "batch"), which is what `jax.pmap` itself lowers to since JAX 0.8:
BatchNorm statistics synchronised across devices (nn.BatchNorm(axis_name="batch")), gradients
combined over devices, and ranking negatives drawn from the global batch (every device's
features all-gathered). The state and batch are global jax.Arrays: W_share is split over its
classes when `model.w_share_sharding="classes"`, everything else replicated; a batch is split
over its rows, each process supplying its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from instance_loss_jax import sharding
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.config import frozen_scopes, uses_mined_negatives
from instance_loss_jax.models import build_model, dropout_mask
from instance_loss_jax.training import losses, optim
from instance_loss_jax.training.batch import check_batch
from instance_loss_jax.training.flops import compiled_flops
from instance_loss_jax.training.state import TrainState, abstract_train_state, variables_of


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
  axis = sharding.AXIS if collectives else None
  num_devices = jax.lax.axis_size(sharding.AXIS) if collectives else 1
  device = jax.lax.axis_index(sharding.AXIS) if collectives else 0
  split_classes = collectives and sharding.classes_sharded(config)
  model = build_model(config, axis_name=axis,
                      num_classes=num_padded // num_devices if split_classes else num_padded)
  gather = ((lambda x: jax.lax.all_gather(x, sharding.AXIS, axis=0, tiled=True))
            if collectives else (lambda x: x))
  mean = (lambda x: jax.lax.pmean(x, sharding.AXIS)) if collectives else (lambda x: x)

  l_rank = float(config.loss.lambdas[0])  # 0: no ranking term, nothing of it computed
  negatives = config.loss.negatives
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  dropout_rng, negatives_rng = jax.random.split(rng)
  labels = batch["labels"]
  rows = labels.shape[0]
  global_rows = rows * num_devices
  all_labels = gather(labels)

  mined_emb = mined_labels = None
  if uses_mined_negatives(config):
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
        sharding.AXIS if split_classes else None)
    n = row_labels.shape[0]
    terms = dict(visual_loss=jnp.mean(cross_entropy[:n]), textual_loss=jnp.mean(cross_entropy[n:]),
                 img_accuracy=jnp.mean(correct[:n]), txt_accuracy=jnp.mean(correct[n:]))
    # Split classes: the losses are global already (psum inside); the hits are the same on
    # every device, but compared with all-gathered labels, which shard_map types as varying.
    terms = {k: v if split_classes and k.endswith("loss") else mean(v) for k, v in terms.items()}
    terms["rank_loss"] = jnp.zeros((), jnp.float32)
    if l_rank:
      # This device's anchors against the global batch (all-gathered, gradients through it).
      img_emb, txt_emb = out["img_emb"], out["txt_emb"]
      pool_txt = gather(txt_emb)
      anchor_rows = (device * rows, global_rows)
      learned = params.get("contrastive")
      if config.loss.ranking == "triplet":
        rank = losses.ranking_loss_against(
            img_emb, txt_emb, labels, gather(img_emb), pool_txt, all_labels, config.loss.margin,
            negatives, negatives_rng, mined_emb, mined_labels, anchor_rows=anchor_rows)
      elif config.loss.ranking == "infonce":
        rank = losses.infonce_loss_against(
            img_emb, txt_emb, labels, gather(img_emb), pool_txt, all_labels,
            learned["log_scale"], config.loss.max_log_scale, anchor_rows=anchor_rows)
      else:  # sigmoid: one sum over (image, text) pairs covers both directions
        rank = losses.sigmoid_loss_against(
            img_emb, txt_emb, labels, pool_txt, all_labels, learned["log_scale"],
            learned["bias"], config.loss.max_log_scale)
      terms["rank_loss"] = mean(rank)
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
  if "contrastive" in state.params:  # the learned temperature (and bias) the step used
    learned = state.params["contrastive"]
    metrics["logit_scale"] = losses.logit_scale(learned["log_scale"], config.loss.max_log_scale)
    if "bias" in learned:
      metrics["logit_bias"] = learned["bias"]
  return checkpoint.state_tree(new_state), metrics


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """step(state, batch) -> (state, metrics) over `mesh`, and the facts about it.

  state: a global TrainState laid out by `sharding.shardings` (see `create_train_state`,
  `place_state`); batch: this process's rows as numpy (checked against the config first, then
  assembled into global arrays), or what `place(rows)` returned for them (ahead of time:
  `training.prefetch.DevicePrefetch`). Metrics come back replicated. `jitted` is the compiled
  function of (state arrays `checkpoint.state_tree(state)`, global batch): benchmarks lower it
  (`abstract_batch`) for XLA's analyses.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  jitted: Any

  def place(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's numpy rows checked against the config, then as global arrays."""
    check_batch(batch, self.config, self.mesh)
    return sharding.global_batch(batch, self.mesh)

  def __call__(self, state, batch):
    if not all(isinstance(v, jax.Array) for v in batch.values()):
      batch = self.place(batch)
    arrays, metrics = self.jitted(checkpoint.state_tree(state), batch)
    return state.replace(**arrays), metrics

  def flops(self, state, batch) -> float | None:
    """XLA's FLOP count of one step per device, for a state and placed batch like those of a
    call made already: the lowering matches that call's, so its executable is reused, not
    compiled again."""
    return compiled_flops(self.jitted.lower(checkpoint.state_tree(state), batch).compile())


def make_train_step(config: ml_collections.ConfigDict, steps_per_epoch: float,
                    mesh=None) -> TrainStep:
  """The train step over `mesh` (default: every device of every process,
  `sharding.make_mesh()`), compiled at its first call. The config is taken as valid (the
  binaries and `train_and_evaluate` validate it)."""
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
  batch_spec = jax.sharding.PartitionSpec(sharding.AXIS)
  if collectives:
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(state_specs, batch_spec),
                       out_specs=(state_specs, jax.sharding.PartitionSpec()))
  # One device: the per-device program is the whole program; no collective is emitted.
  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  jitted = jax.jit(fn, donate_argnums=(0,),
                   out_shardings=(jax.tree_util.tree_map(named, state_specs),
                                  named(jax.sharding.PartitionSpec())))
  return TrainStep(config, mesh, jitted)
