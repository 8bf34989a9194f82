r"""Evaluate a run's checkpoint on a split: retrieval metrics as JSON and a markdown table.

    python -m instance_loss_jax.evaluate --config=configs/flickr30k.py:stage2 --workdir=DIR \
        [--step=N] [--split=test]

Writes DIR/eval/<split>-<step>.json and .md. The config must describe the model the checkpoint
holds (it is checked); the vocabulary is the run's own DIR/vocab.json.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from instance_loss_jax import cli, evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval.split).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config = _CONFIG.value
  results = evaluation.evaluate(config, _WORKDIR.value, _SPLIT.value or config.eval.split,
                                _STEP.value)
  logging.info("wrote %s", results["written"])
  print(evaluation.markdown_table(results))


def run():
  """Console-script entry point."""
  cli.run(main)


if __name__ == "__main__":
  run()
