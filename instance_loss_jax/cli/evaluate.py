r"""Evaluate a run's checkpoint on a split: retrieval metrics as JSON and a markdown table.

    python -m instance_loss_jax.cli.evaluate --config=configs/flickr30k.py:stage2 --workdir=DIR \
        [--step=N] [--split=test] [--print_config]

Writes DIR/eval/<split>-<step>.json and .md, the similarity histograms and feature correlation
as PNG, and a page of the best and worst text->image queries (HTML). The config must describe
the model the checkpoint holds (it is checked); the vocabulary is the run's own DIR/vocab.json.
Checkpoints from any number of devices restore here onto this process's devices.
"""

import logging

from absl import flags
from ml_collections import config_flags

from instance_loss_jax.cli import runner

log = logging.getLogger(__name__)


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file and stage, e.g. "
                                  "configs/flickr30k.py:stage2.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval.split).")
  flags.mark_flags_as_required(["config"])
  runner.define_print_config()
  runner.require_unless_print_config("workdir")


def main(argv):
  del argv  # runner.run refuses positional arguments
  runner.configure_logging()
  # Imported here: TensorFlow (under the evaluation's input pipeline) takes seconds to import,
  # which --help, --print_config and a flag error do not need.
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation.evaluator import evaluate
  from instance_loss_jax.evaluation.tables import markdown_table
  f = flags.FLAGS
  config = f.config
  results = evaluate(config, f.workdir, f.split or config.eval.split, f.step)
  log.info("wrote %s", results["written"])
  print(markdown_table(results))


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
