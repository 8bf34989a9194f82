"""Where a run's first state comes from, in one order: its own newest readable checkpoint
(resume), else Stage I's (`init_from`: every variable, a fresh optimiser), else a fresh init with
the ported ImageNet backbone (`backbone_init`) and the word2vec table put in. Also the
vocabulary (the run's own, init_from's, or built anew) and the input convention the image
branch's weights were trained with. Everything is checked against the run before anything is
compiled."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np

from instance_loss_jax import backbone, paths, training
from instance_loss_jax.config import input_convention, with_input_convention
from instance_loss_jax.data import pseudo_classes
from instance_loss_jax.data import vocab as vocab_lib
from instance_loss_jax.errors import TrainingError
from instance_loss_jax.models.dual_path import contrastive_init
from instance_loss_jax.workdir import checkpoint, faults

log = logging.getLogger(__name__)


def prepare_vocab(config, workdir: str, train_records, need_table: bool):
  """(vocabulary, word2vec table or None): the run's own, else init_from's, else built anew."""
  own = (paths.path(workdir) / vocab_lib.VOCAB_FILE).exists()
  if config.init_from and not paths.path(config.init_from).is_dir():
    raise TrainingError(f"init_from={config.init_from}: no such Stage I workdir")
  kv = None
  if own:
    vocab = vocab_lib.Vocabulary.load(workdir)
  elif config.init_from:
    vocab = vocab_lib.Vocabulary.load(config.init_from)
  elif config.data.word2vec:
    kv = vocab_lib.load_word2vec(config.data.word2vec)
    vocab = vocab_lib.from_word2vec(train_records, kv, config.data.word2vec)
  else:
    vocab = vocab_lib.from_counts(train_records, config.data.min_word_count)
  if own and config.init_from:
    if vocab_lib.Vocabulary.load(config.init_from).fingerprint != vocab.fingerprint:
      raise TrainingError(f"the vocabulary in {workdir} differs from init_from="
                          f"{config.init_from}'s")
  if not (need_table and config.data.word2vec):
    return vocab, None
  kv = kv or vocab_lib.load_word2vec(config.data.word2vec)
  return vocab, vocab_lib.embedding_matrix(vocab, kv, config.model.text.word_dim)


def initial_state(config, workdir: str, mgr, source, meta, table, steps_per_epoch: float, mesh):
  """(global state on `mesh`, first step) by the resume order: own checkpoint (`mgr`), then
  init_from's (`source`). Checkpoints are checked against the run (meta, then names and shapes)
  before anything is compiled."""
  if mgr.all_steps():
    what = f"resuming {workdir}"
    template = training.abstract_train_state(config, steps_per_epoch, mesh)

    def restore_own(step):
      checkpoint.checked_step(mgr, meta, step, what=what)
      return checkpoint.restore_state(mgr, step, template)

    # An unreadable newest checkpoint is moved aside and the one before it taken.
    step, state = faults.newest_readable(mgr, restore_own, what)
    log.info("resuming from %s step %d", workdir, step)
    return state, step
  loaded, scopes = None, ()
  if config.init_from:
    if source is None:
      raise checkpoint.CheckpointError(f"init_from={config.init_from}: no checkpoint in "
                                       f"{paths.join(config.init_from, 'checkpoints')}")
    what = f"init_from={config.init_from}"

    def restore_stage1(step):
      checkpoint.checked_step(source, meta, step, what=what, keys=("num_classes", "vocab"))
      return checkpoint.restore_variables(source, step)

    step, loaded = faults.newest_readable(source, restore_stage1, what)
    name = f"{config.init_from} step {step}"
    loaded = _with_contrastive_start(config, loaded, name)
  elif config.backbone_init:
    _, ported = backbone.load_backbone(config.backbone_init)
    loaded = {k: {"backbone": ported[k]} for k in ("params", "batch_stats")}
    name, scopes = f"backbone {config.backbone_init}", ("params/backbone", "batch_stats/backbone")
  given = {}  # host variables that replace random ones (not drawn)
  if loaded is not None:
    merged = checkpoint.merge_variables(training.abstract_variables(config), loaded, name,
                                        scopes)
    if not scopes:  # init_from: every variable is Stage I's, so none is drawn at random
      log.info("initialised from %s (fresh optimiser state)", name)
      return training.state_from_variables(config, merged, steps_per_epoch, mesh), 0
    given = {k: {"backbone": merged[k]["backbone"]} for k in ("params", "batch_stats")}
    log.info("initialised %s from %s", ", ".join(scopes), name)
  if table is not None:  # only built for a fresh run (no checkpoint, no init_from)
    given.setdefault("params", {})["text_encoder"] = {"word_embedding": {"embedding": table}}
  # SGD's momentum starts at zeros whatever the params, so the given leaves need nothing else.
  return training.create_train_state(config, jax.random.key(config.seed), steps_per_epoch,
                                     mesh, given=given), 0


def pool5_features(config, image_paths: Sequence[str]) -> np.ndarray:
  """The training images' globally pooled features [n, 2048] from `backbone_init`'s ResNet in
  inference mode (its BatchNorm statistics), the images as the evaluation reads them."""
  # Imported here: the pipeline (TensorFlow) only where K is set.
  from instance_loss_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  module, variables = backbone.load_backbone(config.backbone_init)
  embed = jax.jit(lambda v, images: module.apply(v, images, train=False))
  out = np.zeros((len(image_paths), module.width * 32), np.float32)
  for batch in pipeline.numpy_batches(
      pipeline.eval_image_files(image_paths, config, config.eval.batch_size), image_paths):
    out[batch["index"]] = np.asarray(embed(variables, batch["images"]))
  return out


def pseudo_classes_of(config, workdir: str, train_records, convention: dict[str, Any]):
  """Table 5's labels (`data.pseudo_classes`): (records relabelled, the record to keep): the
  run's own recorded ones, else init_from's (Stage II trains Stage I's classes), else k-means
  over pool5 features read with the image branch's input convention."""
  recorded = pseudo_classes.read_recorded(workdir)
  if recorded is None and config.init_from:
    recorded = pseudo_classes.read_recorded(config.init_from)
  config = with_input_convention(config, convention)
  return pseudo_classes.relabel(config, train_records, recorded,
                                lambda image_paths: pool5_features(config, image_paths))


def _with_contrastive_start(config, loaded: dict[str, Any], name: str) -> dict[str, Any]:
  """Stage I's variables, plus a contrastive term's temperature (and bias) at the config's start
  where Stage I had none (trained with the hinge, or with no ranking term: the parameter was
  never trained there, so nothing is lost)."""
  start = contrastive_init(config.loss)
  if not start or "contrastive" in loaded["params"]:
    return loaded
  learned = dict(zip(("log_scale", "bias"), (np.float32(v) for v in start)))
  log.info("%s has no contrastive temperature: starting it at %s", name, learned)
  return {**loaded, "params": {**loaded["params"], "contrastive": learned}}


def input_convention_of(config, mgr, source) -> dict[str, Any]:
  """The pixels' channel order, mean and std: those the image branch's weights were trained with
  (own checkpoint, else Stage I's, else the ported backbone's record), else the config's."""
  for m in (mgr, source):
    meta = checkpoint.newest_meta(m)
    if meta and "input" in meta:
      return meta["input"]
  if config.backbone_init:
    origin = backbone.read_origin(config.backbone_init)
    mismatches = backbone.origin_mismatches(origin, config.model.image)
    if mismatches:
      raise backbone.BackboneError(f"backbone {config.backbone_init} does not fit the config: "
                               + "; ".join(mismatches))
    log.info("input convention from %s: %s", config.backbone_init, origin["input"])
    return origin["input"]
  return input_convention(config)
