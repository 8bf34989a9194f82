r"""Train a dual-path model: one stage per run.

    python -m instance_loss_jax.train --config=configs/flickr30k.py:stage1 --workdir=DIR \
        [--config.batch_size=64 ...]

Re-running the same command in the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from instance_loss_jax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, vocabulary.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.initialize()
  logging.info("config:\n%s", _CONFIG.value)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  """Console-script entry point."""
  cli.run(main)


if __name__ == "__main__":
  run()
