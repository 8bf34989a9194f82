r"""Import the authors' trained dual-path model (MatConvNet `net-epoch-N.mat`) as a run.

    python -m instance_loss_jax.cli.import_matconvnet --model=net-epoch-N.mat \
        --dictionary=flickr30k_dictionary.mat --workdir=RUN [--config=configs/flickr30k.py:stage2]

writes RUN/config.json, RUN/vocab.json and a checkpoint at step 0 that the evaluation binary,
export, search and the Index read like one of ours, and that Stage II can start from
(`--config.init_from=RUN`). The architecture comes from the graph (matconvnet/dual_path.py);
the config file gives the rest (data, evaluation, training), and the log lists every field the
graph set. The vocabulary is the dictionary's `subset.names` in order (column k of their one-hot
input is our word k + 1) and the run splits text as their preparation did
(`data.tokenizer="original"`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from absl import flags
from ml_collections import config_flags

from instance_loss_jax.cli import runner

log = logging.getLogger("instance_loss_jax.import_matconvnet")


def config_overrides(facts: dict[str, Any]) -> dict[str, Any]:
  out = {f"model.image.{k}": tuple(v) if isinstance(v, list) else v
         for k, v in facts["image"].items()}
  out.update({f"model.text.{k}": v for k, v in facts["text"].items() if k != "vocab_size"})
  out.update({"model.text.max_len": facts["max_len"], "model.embed_dim": facts["embed_dim"],
              "model.image_head_layers": facts["image_head_layers"],
              "model.text_head_layers": facts["text_head_layers"],
              "model.head_bn_epsilon": facts["head_bn_epsilon"],
              "model.dropout": facts["dropout"], "model.w_share_bias": facts["w_share_bias"],
              "data.tokenizer": "original",
              # Their test code (test/extract_pic_feature_word2_plus_52.m) sums a caption's
              # fc5_2bn over every shift of it, before the ReLU (eval.features="original").
              "eval.text_shift_sum": True, "eval.features": "original"})
  return out


def dictionary_words(path: str) -> tuple[str, ...]:
  """`subset.names` of the authors' dictionary .mat (make_dictionary.m), in order."""
  # Imported here: the MATLAB readers, with the rest of this binary's work.
  from instance_loss_jax.errors import BackboneError  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.matconvnet import read_mat  # pylint: disable=g-import-not-at-top
  data = read_mat(path)
  subset = data.get("subset")
  if not isinstance(subset, dict) or "names" not in subset:
    raise BackboneError(f"{path}: not the authors' dictionary (no subset.names; found "
                        f"{', '.join(sorted(data)) or 'nothing'})")
  names = subset["names"]
  return (names,) if isinstance(names, str) else tuple(str(n) for n in names)


def import_run(model: str, dictionary: str, workdir: str, config) -> dict[str, Any]:
  """Writes the run directory `workdir` from `config` (a ConfigDict; the graph's facts replace
  its architecture fields) atomically: built beside it, renamed when complete. Returns what
  was set."""
  # Imported here: JAX, Orbax and the model, after the flags are parsed.
  import jax  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import config as config_lib, training  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.workdir import checkpoint  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import sharding  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.errors import BackboneError  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.matconvnet import input_convention, read_dagnn  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.matconvnet.dual_path import dual_path_variables  # pylint: disable=g-import-not-at-top
  for path in (model, dictionary):
    if not os.path.isfile(path):
      raise BackboneError(f"{path}: no such file")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir):
    raise BackboneError(f"{workdir} exists; choose a new run directory")
  dag = read_dagnn(model)
  variables, facts, unused = dual_path_variables(dag)
  words = dictionary_words(dictionary)
  if len(words) + 1 != facts["text"]["vocab_size"]:
    raise BackboneError(f"{dictionary}: {len(words)} words, but {model}'s word embedding takes "
                        f"{facts['text']['vocab_size'] - 1}")
  overrides = config_overrides(facts)
  config = config_lib.apply_overrides(config.copy_and_resolve_references(), overrides)
  config_lib.validate_config(config)
  for key, value in sorted(overrides.items()):
    log.info("from the graph: %s = %s", key, value)
  vocab = Vocabulary(words, f"{os.path.abspath(dictionary)} (subset.names)")
  config = config_lib.run_config(config, vocab.size, facts["num_classes"],
                                 input_convention(dag))
  meta = checkpoint.run_meta(config, vocab.fingerprint)
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  merged = checkpoint.merge_variables(training.abstract_variables(config), variables, model)
  state = training.state_from_variables(config, merged, 1.0, mesh)
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".import-", dir=parent)
  try:
    mgr = checkpoint.manager(tmp)
    checkpoint.save(mgr, 0, state, meta)
    mgr.wait_until_finished()
    mgr.close()
    vocab.save(tmp)
    checkpoint.write_config(tmp, config)
    os.rename(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dict(workdir=workdir, facts=facts, unused=unused, words=len(words),
              classes=facts["num_classes"])


def define_flags():
  """Flags of the binary only: importing the library defines none."""
  flags.DEFINE_string("model", None, "The authors' net-epoch-N.mat (MATLAB v5/v7 or v7.3).",
                      required=True)
  flags.DEFINE_string("dictionary", None, "Their word dictionary .mat (subset.names), e.g. "
                      "flickr30k_dictionary.mat.", required=True)
  flags.DEFINE_string("workdir", None, "Run directory to create.", required=True)
  config_flags.DEFINE_config_file(
      "config", "configs/flickr30k.py:stage2", "Config file and stage for the fields the graph "
      "does not fix (data, evaluation, training); --config.FIELD=VALUE overrides them.",
      lock_config=True)


def main(argv):
  del argv
  f = flags.FLAGS
  done = import_run(f.model, f.dictionary, f.workdir, f.config)
  print(f"imported {f.model} -> {done['workdir']}: {done['words']} words, {done['classes']} "
        f"classes; not used: {done['unused'] or 'none'}")


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
