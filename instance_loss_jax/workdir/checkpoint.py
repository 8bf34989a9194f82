"""Orbax checkpoints of a run, their metadata checks, and the strict by-name parameter merge.

A run's workdir holds `checkpoints/<step>/` (items `state`: params, batch_stats, opt_state,
step; `meta`: what the state was built for), plus `config.json` and `vocab.json`. Before a
checkpoint is used, its `meta` is compared with the current run's, so a checkpoint from another
model or vocabulary is refused with the differences listed instead of failing inside Orbax.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
# The module whose TensorStore context defaults `set_store_retries` extends (no public setter).
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
# Not exported by Orbax (orbax-checkpoint is pinned below 0.13 in setup.cfg): see the handler below.
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from instance_loss_jax import paths, sharding
from instance_loss_jax.workdir import faults
from instance_loss_jax import config as config_lib
from instance_loss_jax.config import input_convention
from instance_loss_jax.errors import CheckpointError, UnreadableCheckpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"  # the run's config as built (`config.run_config`), every field
BEST_METRIC = "rsum"  # the validation figure the best checkpoint is chosen by
# Orbax's jax.Array writer (on CPU and TPU) splits each replicated array into one slice per
# replica, so that the hosts holding copies share its write. Each slice is an eager jit(slice)
# that XLA compiles once per shape and offset in every process: the first save of a small
# model on 8 CPU devices spent 15.7 s compiling them (1.0 s without) to write a few KB per
# slice. Below this size a slice is not worth its compile: one replica writes the array whole.
# Large replicated arrays (word embeddings, wide kernels) keep the shared write.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler(ocdbt: bool) -> ocp.PyTreeCheckpointHandler:
  """The train state's writer: Orbax's own, with the jax.Array handler above in a registry of
  its own (Orbax's global registry, which every other user of Orbax in the process shares, is
  left as it is). The files are those of Orbax's standard handler, which reads them back."""
  registry = type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY
  arrays = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),  # as in Orbax's default handler
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  handlers = [(t, arrays if t is jax.Array else registry.get(t))
              for t in type_handler_registry.supported_types()]
  return ocp.PyTreeCheckpointHandler(
      use_ocdbt=ocdbt,
      type_handler_registry=type_handler_registry.create_type_handler_registry(*handlers))


def run_meta(config, vocab_fingerprint: str) -> dict[str, Any]:
  """What a checkpoint's arrays depend on: the model, the class count, the vocabulary, and the
  input convention its image branch was trained with."""
  model = config.model.to_dict()
  model.pop("w_share_sharding", None)  # a layout on the devices, not part of the arrays
  return json.loads(json.dumps(dict(model=model, num_classes=config.num_classes,
                                    vocab=vocab_fingerprint, stage=config.stage,
                                    input=input_convention(config))))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  paths.write_text(paths.join(workdir, CONFIG_FILE), config.to_json(indent=1))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded (vocabulary size, class count and input convention resolved):
  what its checkpoints are read with."""
  recorded = paths.read_json(
      paths.join(workdir, CONFIG_FILE), CheckpointError,
      missing=f"no such file (is {workdir} a training run's workdir?)", what="not a run config")
  return ml_collections.ConfigDict(config_lib.with_recorded_defaults(recorded))


def retry_policy(seconds: float) -> dict[str, Any]:
  """TensorStore's request-retry resource (`gcs_request_retries`, `s3_request_retries`) that
  keeps retrying for about `seconds`: waits from min(1 s, seconds / 16), doubling, to at most
  min(32 s, seconds / 4), as many as add up to `seconds`."""
  initial = min(1.0, seconds / 16)
  ceiling = min(32.0, max(initial, seconds / 4))
  waited, delay, retries = 0.0, initial, 0
  while waited < seconds:
    waited, delay, retries = waited + delay, min(2 * delay, ceiling), retries + 1
  return {"max_retries": retries, "initial_delay": f"{initial:g}s", "max_delay": f"{ceiling:g}s"}


def set_store_retries(seconds: float) -> None:
  """Makes every checkpoint save and restore of this process retry a failing object store for
  about `seconds` (config.storage_retry_s) before it gives up.

  Orbax opens TensorStore with contexts built from two module-level defaults and has no setter
  for them (orbax-checkpoint 0.12): the retry resources are added to those dicts."""
  policy = retry_policy(seconds)
  # pylint: disable=protected-access
  for defaults in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    defaults.update(gcs_request_retries=dict(policy), s3_request_retries=dict(policy))


def reader(workdir: str) -> ocp.CheckpointManager | None:
  """A read-only manager of a workdir's checkpoints, or None when it has no checkpoint folder.
  (Orbax logs a warning for each read-only manager: open one per directory and pass it on.)"""
  if not (paths.path(workdir) / CHECKPOINT_DIR).is_dir():
    return None
  return manager(workdir, read_only=True)


def newest_meta(mgr: ocp.CheckpointManager | None) -> dict[str, Any] | None:
  """The meta of the manager's newest readable checkpoint, or None when there is none (what
  it says is the same for every step of a run; an unreadable step is the restore's to
  report)."""
  for step in sorted(mgr.all_steps() if mgr is not None else (), reverse=True):
    try:
      return read_meta(mgr, step)
    except UnreadableCheckpoint:
      continue
  return None


def meta_differences(saved: dict[str, Any], current: dict[str, Any],
                     keys=("model", "num_classes", "vocab")) -> list[str]:
  """Dotted paths whose values differ, e.g. 'model.text.blocks: [3, 4, 6, 1] vs [3, 4, 6, 3]'."""
  diffs = []

  def walk(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
    elif a != b:
      diffs.append(f"{path}: checkpoint {a!r} vs run {b!r}")

  for key in keys:
    walk(saved.get(key, "<absent>"), current.get(key, "<absent>"), key)
  return diffs


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, knowing the step of its newest save: an asynchronous save's failure
  surfaces at a later call (`finish`), which names that step."""

  saving_step: int | None = None

  def save(self, step: int, *args, **kwargs) -> bool:
    self.saving_step = step
    return super().save(step, *args, **kwargs)


def manager(workdir: str, keep: int = 3, read_only: bool = False,
            ocdbt: bool = True) -> ocp.CheckpointManager:
  # A reader's options as Orbax wants them for read_only (else it warns about each, every time).
  # A writer keeps the newest `keep` checkpoints and, beside them, the one whose validation
  # (saved with metrics, see `save`) has the highest rsum.
  policies = ocp.checkpoint_managers
  options = (ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                          save_interval_steps=0) if read_only else
             ocp.CheckpointManagerOptions(
                 # A save that failed leaves `<step>.orbax-checkpoint-tmp`: the next writer
                 # removes it (readers never take it for a checkpoint).
                 create=True, cleanup_tmp_directories=True,
                 preservation_policy=policies.AnyPreservationPolicy([
                     policies.LatestN(n=keep),
                     policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                    keep_checkpoints_without_metrics=False)])))
  return _Manager(
      paths.join(paths.absolute(workdir), CHECKPOINT_DIR), options=options,
      item_handlers=dict(state=_state_handler(ocdbt), meta=ocp.JsonCheckpointHandler()))


def state_tree(state) -> dict[str, Any]:
  """The saved part of a TrainState."""
  return dict(params=state.params, batch_stats=state.batch_stats, opt_state=state.opt_state,
              step=state.step)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict[str, Any],
         val_metrics: dict[str, float] | None = None) -> None:
  """Saves a train state of global arrays: every process calls this and writes the shards it
  holds. W_share is stored as it lies on the mesh, padded with zero classes up to a multiple
  of the device count; `meta["num_classes"]` is the true count, and every restore pads or cuts
  to what the reader needs (the padding is zeros, so nothing is lost either way).

  The write goes on in the background (Orbax's async save): a failure surfaces at the next
  `save` or `finish`, as a StorageError naming the step that failed."""
  finish(mgr)  # a failure of the previous save is that step's, not this one's
  metrics = None
  if val_metrics is not None:
    metrics = {k: float(v) for k, v in val_metrics.items()}
    meta = dict(meta, val=metrics)
  try:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state_tree(state)),
                                           meta=ocp.args.JsonSave(meta)), metrics=metrics,
             force=True)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _save_failure(mgr, step, e) from None


def finish(mgr: ocp.CheckpointManager) -> None:
  """Waits for the background save; one that failed is raised as a StorageError."""
  try:
    mgr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _save_failure(mgr, getattr(mgr, "saving_step", None), e) from None


def _save_failure(mgr: ocp.CheckpointManager, step: int | None, error: BaseException):
  try:
    kept = sorted(mgr.all_steps())
  except Exception:  # pylint: disable=broad-exception-caught
    kept = []
  return faults.save_failure(str(mgr.directory), step, error, kept)


def best_step(mgr: ocp.CheckpointManager) -> int | None:
  """The kept checkpoint with the highest validation rsum, or None if none was validated."""
  scored = []
  for step in mgr.all_steps():
    try:
      val = read_meta(mgr, step).get("val")
    except UnreadableCheckpoint as e:  # the reader that restores it says so
      log.warning("%s", e)
      continue
    if val and BEST_METRIC in val:
      scored.append((val[BEST_METRIC], -step, step))  # ties: the earlier step
  return max(scored)[2] if scored else None


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  with _reading(mgr, step):
    meta = _restore_item(mgr, step, "meta", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore())
  return config_lib.with_recorded_defaults(meta)


def _restore_item(mgr: ocp.CheckpointManager, step: int, item: str, handler, args):
  """One item of a step, read by this process without waiting for the others. Orbax's restore
  ends at a barrier of every process: one that failed to read (its own shards: a damaged file
  another process never opens) would leave the others waiting there, where
  `faults.newest_readable` needs every process to meet and agree on a step instead. What each
  process reads is the same either way: the shards of its own devices."""
  me = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  with ocp.Checkpointer(handler, multiprocessing_options=alone) as checkpointer:
    return checkpointer.restore(paths.path(str(mgr.directory)) / str(step) / item, args=args)


@contextlib.contextmanager
def _reading(mgr: ocp.CheckpointManager, step: int):
  """Any failure to read step's files (Orbax's, TensorStore's, the file system's) raised as an
  UnreadableCheckpoint naming it, the cause and the other steps; our own refusals (a
  checkpoint that does not fit the run) pass as they are."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    others = sorted(s for s in mgr.all_steps() if s != step)
    raise UnreadableCheckpoint(
        f"checkpoint {mgr.directory}/{step} cannot be read: {faults.cause(e)} (other steps there: "
        f"{', '.join(map(str, others)) or 'none'})", step) from None


STEP_PREFERENCES = ("newest", "best")


def resolve_step(mgr: ocp.CheckpointManager, step: int | None = None, prefer: str = "newest",
                 what: str = "checkpoint") -> int:
  """The one rule for which checkpoint a reader uses (resume, init_from, the evaluation, the
  index): `step` when given, which must exist; else the newest, or with prefer="best" the kept
  one with the best validation rsum (`best_step`) when the run validated, else the newest."""
  if prefer not in STEP_PREFERENCES:
    raise ValueError(f"prefer={prefer!r}: one of {STEP_PREFERENCES}")
  steps = mgr.all_steps()
  if not steps:
    raise CheckpointError(f"{what}: no checkpoint in {mgr.directory}")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"{what}: no step {step} in {mgr.directory} (have {sorted(steps)})")
    return int(step)
  best = best_step(mgr) if prefer == "best" else None
  return int(best if best is not None else max(steps))


def checked_step(mgr: ocp.CheckpointManager, meta: dict[str, Any], step: int | None = None,
                 what: str = "checkpoint", keys=("model", "num_classes", "vocab"),
                 prefer: str = "newest") -> int:
  """`resolve_step`'s step after checking its meta against `meta` on `keys`."""
  step = resolve_step(mgr, step, prefer, what)
  check_meta(read_meta(mgr, step), meta, f"{what} {mgr.directory}/{step}", keys)
  return step


def check_meta(saved: dict[str, Any], meta: dict[str, Any], where: str,
               keys=("model", "num_classes", "vocab")) -> None:
  """Raises CheckpointError listing every difference of a checkpoint's meta from the run's."""
  diffs = meta_differences(saved, meta, keys)
  if diffs:
    raise CheckpointError(f"{where} does not match this run: " + "; ".join(diffs))


def saved_arrays(mgr: ocp.CheckpointManager, step: int):
  """A checkpoint's state tree with array metadata (.shape, .dtype) as leaves."""
  return mgr.item_metadata(step)["state"].tree


def _variables_shapes(tree) -> dict[str, tuple[tuple[int, ...], bool]]:
  """{"params/w_share/kernel": (shape, under W_share), ...} over params and batch_stats."""
  leaves = jax.tree_util.tree_flatten_with_path(
      {k: tree[k] for k in ("params", "batch_stats")})[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"):
          (tuple(x.shape), sharding.is_w_share(p)) for p, x in leaves}


def _check_shapes(mgr, step, target, what: str) -> None:
  """Every variable of `target` (a state_tree) must be in the checkpoint with its shape,
  W_share's class axis aside (padding differs between meshes). The optimiser state follows
  the parameters."""
  saved = _variables_shapes(saved_arrays(mgr, step))
  problems = []
  for key, (shape, classes_last) in _variables_shapes(target).items():
    if key not in saved:
      problems.append(f"{key} missing")
      continue
    got = saved[key][0]
    if (shape[:-1] != got[:-1]) if classes_last else (shape != got):
      problems.append(f"{key}: checkpoint {got} vs run {shape}")
  if problems:
    raise CheckpointError(f"{what} {mgr.directory}/{step} does not fit this run's state: "
                          + "; ".join(problems))


def restore_state(mgr: ocp.CheckpointManager, step: int, template):
  """The full train state (for resuming) into `template`'s structure and layout: a TrainState
  of ShapeDtypeStructs with shardings (`training.abstract_train_state`) on any mesh. W_share
  is padded or cut to the template's width (the stored padding is zeros)."""
  target = state_tree(template)
  with _reading(mgr, step):
    _check_shapes(mgr, step, target, "resuming")
    tree = _restore_item(mgr, step, "state", ocp.StandardCheckpointHandler(),
                         ocp.args.StandardRestore(target, strict=False))
  return template.replace(**tree)


def restore_variables(mgr: ocp.CheckpointManager, step: int,
                      w_share: bool = True) -> dict[str, Any]:
  """params and batch_stats of a checkpoint as host numpy arrays, W_share cut to the true class
  count (any model's; whatever mesh wrote it). Only these are read: not the optimiser state,
  nor W_share and its class axis when `w_share` is False (the embeddings do not use it; at
  millions of classes it is most of the checkpoint).

  Orbax's partial restore over the step's state item: arrays absent from the target are
  skipped, never read (tests/test_checkpoint.py deletes them from disk first)."""
  with _reading(mgr, step):
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = saved_arrays(mgr, step)
    wanted = dict(params=saved["params"], batch_stats=saved["batch_stats"])
    if not w_share:
      wanted["params"] = {k: v for k, v in wanted["params"].items() if k != sharding.W_SHARE}
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted)
    # Cut the padding.
    target = sharding.pad_classes(target, read_meta(mgr, step)["num_classes"])
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype,
                                       strict=False), target)
    # The manager's "state" handler restores whole trees; a PyTree handler on the same
    # directory takes the partial target (the layout on disk is the same).
    tree = _restore_item(mgr, step, "state", ocp.PyTreeCheckpointHandler(),
                         ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                partial_restore=True))
    return jax.tree_util.tree_map(np.asarray, tree)


def merge_variables(target: dict[str, Any], loaded: dict[str, Any], source: str,
                    scopes: tuple[str, ...] = ()) -> dict[str, Any]:
  """`target` ({params, batch_stats}) with its leaves under `scopes` (e.g. "params/backbone";
  default: all) replaced by the same-named leaves of `loaded`.

  Names and shapes must match exactly: a leaf missing on either side or of another shape fails,
  and the error lists every one, both sides named (as big_vision's merge does).
  """
  flat_target = flax.traverse_util.flatten_dict(flax.core.unfreeze(target), sep="/")
  flat_loaded = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")

  def in_scope(key):
    return not scopes or any(key == s or key.startswith(s + "/") for s in scopes)

  wanted = {k for k in flat_target if in_scope(k)}
  missing = sorted(wanted - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - wanted)
  shape = lambda x: tuple(getattr(x, "shape", np.shape(x)))  # arrays or ShapeDtypeStructs
  shapes = sorted(f"{k}: run {shape(flat_target[k])} vs {source} {shape(flat_loaded[k])}"
                  for k in wanted & set(flat_loaded)
                  if shape(flat_target[k]) != shape(flat_loaded[k]))
  if missing or unexpected or shapes:
    parts = []
    if missing:
      parts.append(f"missing in {source}: {', '.join(missing)}")
    if unexpected:
      parts.append(f"only in {source}: {', '.join(unexpected)}")
    if shapes:
      parts.append(f"shape mismatches: {'; '.join(shapes)}")
    raise CheckpointError(f"cannot load {source}: " + " | ".join(parts))
  for k in wanted:
    flat_target[k] = np.asarray(flat_loaded[k], dtype=flat_target[k].dtype)
  return flax.traverse_util.unflatten_dict(flat_target, sep="/")
