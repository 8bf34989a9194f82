r"""Train a dual-path model: one stage per run.

    python -m instance_loss_jax.cli.train --config=configs/flickr30k.py:stage1 --workdir=DIR \
        [--config.batch_size=64 ...] [--print_config]

Re-running the same command in the same workdir resumes from its newest checkpoint. On SIGTERM
(SLURM, a GPU host going down) or a TPU preemption notice the run saves the step it is at and
exits with status 143; the same command then resumes. Every field of the config can be set with
--config.FIELD=VALUE; --print_config prints them all with their values.

How long a run trains: --config.optim.schedule, phases of (epochs, learning-rate factor), e.g.
--config.optim.schedule='((20, 1.0), (10, 0.1))' (30 epochs, the last 10 at a tenth of the
rate) or '((5, 1.0),)' for 5 epochs (the trailing comma makes it a tuple of one phase).
"""

from absl import flags
from ml_collections import config_flags

from instance_loss_jax import paths
from instance_loss_jax.cli import runner


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file and stage, e.g. "
                                  "configs/flickr30k.py:stage1.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, vocabulary (local or "
                      "an object store).")
  flags.mark_flags_as_required(["config"])
  runner.define_flags()
  runner.define_compile_cache_flag()
  runner.define_print_config()
  runner.require_unless_print_config("workdir")


def main(argv):
  del argv  # runner.run refuses positional arguments
  runner.initialize()
  runner.use_compile_cache(paths.join(flags.FLAGS.workdir, "compile_cache"))
  # Imported here, not at the top: TensorFlow (tf.data, under the trainer) takes seconds to
  # import, which --help, --print_config and a flag error do not need.
  from instance_loss_jax import trainer  # pylint: disable=g-import-not-at-top
  # The whole config goes to WORKDIR/config.json (and --print_config shows it).
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
